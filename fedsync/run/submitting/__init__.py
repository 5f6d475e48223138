"""The submitter's bookkeeping (`fedsync infer`): a job's files, routing chunks to workers, merging predictions."""
