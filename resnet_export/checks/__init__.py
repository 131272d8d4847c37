"""Whether an artifact computes what PyTorch does: verification and its gates, statistics, the reference it carries,
and whether it may be served."""
