"""Benchmarks of fastcoop against the published CoOp computation (run as `python -m benchmarks`)."""
