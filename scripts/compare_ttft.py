"""Time to first token of a ~430-token prompt (max_tokens 1, a different first word each time so no
prefix is cached) against OpenAI-compatible servers: roseinfer and llama.cpp's on the CPU.

    python scripts/compare_ttft.py   # servers on :8011 (roseinfer) and :8001 (llama-cpp-python), as
                                     # in docs/BENCHMARKS.md's CPU-default section
"""

import time, httpx, statistics
text = ("The lighthouse stood at the end of a narrow spit of rock, and for most of the year the only visitors "
        "were gulls and the occasional fisherman sheltering from a squall. ") * 12
for name, url, model in (("roseinfer", "http://127.0.0.1:8011", "smollm2-135m-instruct"), ("llama.cpp", "http://127.0.0.1:8001", "smollm2")):
    times = []
    for i in range(4):
        body = {"model": model, "prompt": f"{i} " + text, "max_tokens": 1, "temperature": 0}
        t = time.perf_counter(); r = httpx.post(url + "/v1/completions", json=body, timeout=60); times.append(time.perf_counter() - t)
        usage = r.json()["usage"]
    print(name, "prompt tokens", usage["prompt_tokens"], "TTFT (1 token) median %.0f ms" % (statistics.median(times[1:]) * 1e3), [round(x * 1e3) for x in times])
