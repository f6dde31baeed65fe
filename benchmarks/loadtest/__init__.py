"""Load test: a bounded load on loopback, every answer checked against the contract, memory watched.

    scripts/loadtest                  # 16 clients for 2 minutes at clip, 10 % bad inputs, then the overload phase
    scripts/loadtest --quick          # the same, 20 s + 5 s: a smoke run
    scripts/loadtest --target index   # through the local gateway (as scripts/serve runs it): index -> clip hop
    scripts/loadtest --target both    # through the local gateway, each request to clip or index at random

The functions run as real processes from faas-cli-style build contexts (the code a container runs), with
the real architecture (default ViT-B-32) and CLIP_PRETRAINED=none: random weights, the same compute.
Label embeddings are cached in bench-results/cache (shared with scripts/bench), so only the first run
pays for building them.

Main phase: N clients (one requests.Session each, a timeout on every request) send a mix of good inputs
(raw JPEG and PNG, a large JPEG, multipart with options, JSON base64, a data URL, custom labels, a batch
of two) and, with probability --bad-fraction, bad ones (random bytes, a truncated JPEG, text, an empty body,
broken JSON, top_k=abc, a PNG decompression-bomb header, an unknown label_set, a PUT), each with the
status and error code it must get. Any POST may also get 429 with Retry-After, bad ones too: a full
function refuses before it reads the body (counted apart; the client then waits as told). Any other
status or code is unexpected; a body that is not the contract's JSON is a contract violation; a requests
exception is a connection error. The resident memory of the clip process (and its children) is sampled
every second.

Hostile phase (unless --no-hostile, --hostile-duration s, default 30): the same clients, half of their
requests bombs and floods (JPEGs padded with fill bytes or empty segments or 500 scans, an RLE BMP, a
48-megapixel 16-bit PNG, a million-item JSON list, 300,000 form parts, a lone surrogate, 400 new labels):
no 5xx, the normal requests' p99 within the overload bound below, and clip's RSS after 5 s idle within
15 % of where the main phase ended.

Overload phase (unless --no-overload): --overload-clients clients (default 64, more than the function
admits) on the same process: it must shed load with 429 + Retry-After, and the 200s' p99 must stay
bounded: <= 1.5 × (ceil(max_queue / max_batch) + 1) × the main phase's p50 (a request admitted among
max_queue images waits for at most ceil(q / b) batches plus its own; the main phase's 16 clients keep
about two batches in flight, so its p50 is about two batch times; 1.5 is headroom for a busy machine).
Client latency includes any wait for one of the function's FUNCTION_THREADS worker threads; "time inside
clip's handler" (the answer's elapsed_ms) excludes it. Settings come from the environment as in
scripts/serve (e.g. CLIP_MAX_QUEUE=8 scripts/loadtest).

The functions run with CLIP_PRELOAD_LABEL_SETS=cifar100,cifar10 (the inputs use both), LOG_LEVEL=WARNING.
Through the gateway (--target index/both), index reaches clip's process directly, as scripts/serve runs it.

The batch-size and queue-wait distributions of each phase come from clip's GET /metrics (the
clip_batch_size and clip_queue_wait_seconds histograms, scraped before and after the phase).

Prints a table (figure, value, limit, ok) and writes JSON (bench-results/loadtest-<time>.json);
exits 1 when a limit fails.
"""
