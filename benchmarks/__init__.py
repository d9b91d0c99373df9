"""Benchmark scripts: attention_latency (kernel level), decode_latency (end to end)."""
