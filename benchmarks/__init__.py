"""Benchmarks and the load test (not tests): they run the functions through localrun exactly as
`scripts/serve` does.

- bench: `scripts/bench` (python -m benchmarks.bench): the options, and which of the parts below runs;
- forward, served, numerics, bench_tables, timing: its parts: the model's own forward time (the reference),
  the served figures, bf16 against fp32, the printed tables, and the interleaved timing they share;
- bench_gpu: `scripts/bench --gpu`: the GPU path, from the raw model to served images/s;
- intake: `scripts/bench --intake`: host CPU per request before the model (parsing and the device path's checks);
- loadtest: `scripts/loadtest` (python -m benchmarks.loadtest): payloads, contract check, run, report;
- measure: timing, memory sampling, the machine's description and the table printer they share;
- pictures: the synthetic photos (also used by tests/test_device_decode.py).
"""
