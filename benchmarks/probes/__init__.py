"""One-off probes behind benchmarks/NOTES.md; run each as ``python -m benchmarks.probes.<name>``."""
