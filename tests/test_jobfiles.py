"""How a job is cut (fedsync/run/submitting/jobs.py): chunk sizes, and job.yaml's bound at the most chunks a job may
have."""

from __future__ import annotations

from fedsync.run.submitting.jobs import MAX_CHUNKS, default_chunk_rows
from fedsync.storage.markers import ChunkRef, FileRef, JobMarker, TaskRecord, to_dict
from fedsync.storage.yamlfile import MAX_YAML_BYTES, dump_yaml


def test_default_chunks_are_about_4_mib_at_least_32_of_them_and_never_too_many() -> None:
    assert default_chunk_rows(100_000, 256) == 3_125                 # digits: 32 chunks
    assert default_chunk_rows(50_000, 3 * 32 * 32 * 4) == 341        # CIFAR-10 shapes: 4 MiB each
    assert default_chunk_rows(1_000, 256) == 256                     # never tinier than 256 inputs
    assert default_chunk_rows(10_000_000, 256) == 16_384             # 4 MiB of digits
    huge = default_chunk_rows(10**9, 256)
    assert -(-10**9 // huge) <= MAX_CHUNKS                           # job.yaml can list them


def test_a_job_of_the_most_chunks_stays_under_the_yaml_bound() -> None:
    chunks = [ChunkRef(file=f"inputs/{i:06d}.safetensors", blake3="a" * 64, bytes=10**12, rows=10**6)
              for i in range(MAX_CHUNKS)]
    marker = JobMarker(format=2, job="j" * 64, run_id="20261202-120545-5ae7fe",
                       task=TaskRecord("package.module:task", "1.0.0", "b" * 64), model_name="resnet18",
                       model=FileRef("model.safetensors", "c" * 64, 10**9), model_source="file model.safetensors",
                       inputs="tensors", source="d" * 64, rows=10**6 * MAX_CHUNKS, chunk_rows=10**6, chunks=chunks,
                       created_at="2026-12-02T12:17:01+00:00")
    assert len(dump_yaml(to_dict(marker))) < MAX_YAML_BYTES
