"""Secure aggregation after SecAgg+ (Bell et al., CCS 2020), the maths without I/O: Shamir sharing of secrets,
masks expanded from seeds, the integer encoding of weighted updates, the neighbourhood graph, and the envelopes that
carry a share to one neighbour. docs/PROTOCOL.md says which file of a round holds what.
"""
