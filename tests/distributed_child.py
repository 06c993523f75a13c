"""One rank of tests/test_distributed.py's launch: loads each (checkpoint, mode) of the job file
with `load(..., group=...)`, runs the job's prompts greedily and writes, per rank, the tokens,
log-probabilities, tensors read and the memory the weights took; with a drafter, its first
draft step's logits and the first prompt's reply drafted, greedy and sampled.

Usage (under mlx.launch): python distributed_child.py JOB.json OUT_PREFIX
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import media_files as mf  # noqa: E402
from mlx_gemma import load  # noqa: E402
from drafting import draft_step  # noqa: E402
from mlx_gemma.generation import stream_generate  # noqa: E402
from mlx_gemma.speculative import load_drafter  # noqa: E402

DRAFT_IDS = list(range(30, 78))  # 3 sliding windows of the tiny checkpoint


def media(prompt: dict) -> dict:
    out = {}
    if prompt.get("image"):
        out["image"] = [mf.noise_image(64, 80, seed=1)]
    if prompt.get("audio"):
        out["audio"] = [(mf.chirp(16_000, 0.5), 16_000)]
    return out


def run(model, processor, prompt: dict, drafter=None, temp: float = 0.0) -> dict:
    """The reply's tokens and log-probabilities (sampled from seed 0 when `temp` > 0)."""
    tokens, logprobs = [], []
    mx.random.seed(0)
    for r in stream_generate(model, processor, prompt["text"], max_tokens=prompt["max_tokens"], temp=temp,
                             prefill_step_size=prompt.get("step", 512), draft_model=drafter, **media(prompt)):
        tokens.append(r.token)
        logprobs.append(np.array(r.logprobs).tolist())
    return {"tokens": tokens, "logprobs": logprobs}


def main(job_file: str, out_prefix: str) -> None:
    job = json.loads(Path(job_file).read_text())
    group = mx.distributed.init()
    results = []
    for case in job["cases"]:
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        model, processor = load(case["model"], group=group, parallel=case["mode"])
        loaded = mx.get_peak_memory() - before
        outputs = [run(model, processor, p) for p in case["prompts"]]
        table = model.language_model.model.embed_tokens
        results.append({"model": case["model"], "mode": case["mode"], "tensors_read": model.tensors_read,
                        "weights_peak": loaded, "outputs": outputs,
                        "head_rows": (table.table if hasattr(table, "table") else table).weight.shape[0]})
        if case.get("drafter"):  # the first draft step after DRAFT_IDS, and a drafted greedy reply
            drafter = load_drafter(case["drafter"], target=model)
            results[-1]["draft_logits"] = np.array(draft_step(drafter, model, mx.array([DRAFT_IDS]))[0]).tolist()
            results[-1]["drafted"] = run(model, processor, case["prompts"][0], drafter)
            results[-1]["sampled"] = run(model, processor, case["prompts"][0], drafter, temp=1.0)
        del model, processor
    Path(f"{out_prefix}.{group.rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
