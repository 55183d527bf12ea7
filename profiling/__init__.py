"""nectar_profiling: `nectar profile`, per-token decode latency of Nectar and full attention."""
