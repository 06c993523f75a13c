"""Tensor and pipeline parallel on two local ranks (the ring backend on 127.0.0.1) against the
one-process run, and what a multi-rank CLI run does when a rank fails.

Launches are few and bounded: one runs every (checkpoint, mode) of the library checks
(tests/distributed_child.py writes the results), a few run the CLI. Ranks are started as
mlx.launch starts them (`run_ranks`, `start_ranks`) but without the launcher, which busy-polls:
on the 2-core machine it took as much CPU as a rank. One short CLI run goes through mlx.launch
itself (the launcher's path: its environment, output merged from the ranks, exit codes).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import reference
from benchmarks.distributed import loopback_hostfile
from drafting import draft_step
from distributed_child import DRAFT_IDS, run as run_prompts
from mlx_gemma.config import ModelConfig
from mlx_gemma.distributed import check_tensor_parallel, layer_costs, split_layers
from mlx_gemma.errors import DistributedError
from mlx_gemma.loading import read_safetensors_header, weight_files
from mlx_gemma.model import sanitize
from mlx_gemma.speculative import load_drafter


REPO = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")
W = reference.WINDOW
PROMPTS = [  # longer than the window, chunked prefill; an image; an audio clip
    {"text": "the a is of and " * 6, "max_tokens": 24, "step": 7},
    {"text": "describe", "image": True, "max_tokens": 4},
    {"text": "what is it", "audio": True, "max_tokens": 4},
]
# How many of PROMPTS each checkpoint runs: the 4-bit one checks quantized splits, on text (the
# media embedders are not split).
RUNS = {"float32": 3, "4-bit": 1}


@pytest.fixture(scope="module")
def four_bit(quant_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist4") / "tiny-4bit"
    subprocess.run([sys.executable, "-m", "mlx_gemma.quantize", "--model", str(quant_source), "--out", str(out),
                    "--bits", "4", "--group-size", "32"], check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def layer_heavy(tmp_path_factory):
    """Layers that outweigh the media embedders, so that a stage's share shows in its memory."""
    return reference.build_checkpoint(tmp_path_factory.mktemp("heavy") / "tiny-heavy", hidden_size=128,
                                      intermediate_size=1024, head_dim=32, global_head_dim=64)


def run_ranks(tmp: Path, args: list, timeout: float = 300, input: str = None) -> list:
    """2 ranks of `args` on 127.0.0.1, as mlx.launch starts them (its ring hostfile, MLX_RANK,
    `input` to every rank as it broadcasts its own), in a process group of their own that is
    killed at the end, so that no rank outlives the test, passed or failed. Each rank ends on
    its own (a failed peer is noticed through the heartbeat). [rank 0's, rank 1's]
    CompletedProcess; outputs go through files, which no rank can block on."""
    hostfile = loopback_hostfile(tmp / "hosts.json", 2)
    (tmp / "stdin.txt").write_text(input or "")
    procs = []
    try:
        for r in range(2):
            with open(tmp / "stdin.txt") as stdin, open(tmp / f"rank{r}.out", "w") as out, \
                    open(tmp / f"rank{r}.err", "w") as err:
                procs.append(subprocess.Popen(
                    args, text=True, env=dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)), cwd=REPO,
                    stdin=stdin if input is not None else subprocess.DEVNULL, stdout=out, stderr=err,
                    process_group=procs[0].pid if procs else 0))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        try:
            os.killpg(procs[0].pid, signal.SIGKILL)
        except (IndexError, ProcessLookupError):  # none started, or everyone has exited already
            pass
        for p in procs:
            p.wait()
    return [subprocess.CompletedProcess(p.args, p.returncode, (tmp / f"rank{r}.out").read_text(),
                                        (tmp / f"rank{r}.err").read_text()) for r, p in enumerate(procs)]


@pytest.fixture(scope="module")
def launched(hf_checkpoint, four_bit, layer_heavy, drafter_checkpoint, tmp_path_factory):
    """Every library case in one launch: {(model, mode): [rank 0 result, rank 1 result]}."""
    cases = [{"model": str(m), "mode": mode, "prompts": PROMPTS[:RUNS[which]]}
             for m, which in ((hf_checkpoint, "float32"), (four_bit, "4-bit")) for mode in ("tensor", "pipeline")]
    for case in cases[:2]:  # float32, tensor and pipeline parallel
        case["drafter"] = str(drafter_checkpoint)
    cases += [{"model": str(layer_heavy), "mode": "pipeline", "prompts": []}]  # its memory only
    tmp = tmp_path_factory.mktemp("launch")
    (tmp / "job.json").write_text(json.dumps({"cases": cases}))
    r = run_ranks(tmp, [sys.executable, str(REPO / "tests" / "distributed_child.py"), str(tmp / "job.json"),
                        str(tmp / "out")], timeout=300)
    ranks = []
    for rank in (0, 1):
        f = tmp / f"out.{rank}.json"
        assert f.exists(), r[rank].stdout[-2000:] + r[rank].stderr[-4000:]
        ranks.append(json.loads(f.read_text()))
    return {(c["model"], c["mode"]): [ranks[0][i], ranks[1][i]] for i, c in enumerate(cases)}


@pytest.fixture(scope="module")
def one_process(hf_checkpoint, four_bit):
    from mlx_gemma import load

    out = {}
    for m, which in ((hf_checkpoint, "float32"), (four_bit, "4-bit")):
        model, processor = load(m)
        out[str(m)] = [run_prompts(model, processor, p) for p in PROMPTS[:RUNS[which]]]
    return out


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
@pytest.mark.parametrize("which", ["float32", "4-bit"])
def test_same_tokens_and_logits_as_one_process(launched, one_process, hf_checkpoint, four_bit, mode, which):
    model = str(hf_checkpoint if which == "float32" else four_bit)
    ranks = launched[model, mode]
    assert len(ranks[0]["outputs"]) == len(one_process[model]) == RUNS[which]
    for prompt, ours, theirs, other_rank in zip(PROMPTS, ranks[0]["outputs"], one_process[model], ranks[1]["outputs"]):
        label = f"{which} {mode}: {prompt['text'][:20]!r}"
        assert ours["tokens"] == theirs["tokens"], label
        assert other_rank["tokens"] == ours["tokens"], label  # every rank samples the same token
        # the first step's distribution: the prompt went through the whole split model
        err = np.abs(np.array(ours["logprobs"]) - np.array(theirs["logprobs"])).max()
        assert err < 1e-4, f"{label}: {err}"
    if mode == "pipeline":  # no reduction is reordered: the same arithmetic, bit for bit
        assert ranks[0]["outputs"][0]["logprobs"] == one_process[model][0]["logprobs"]
    # Tensor parallel splits the tied embedding / head by vocabulary rows; each stage holds it whole.
    assert [r["head_rows"] for r in ranks] == [reference.VOCAB // (2 if mode == "tensor" else 1)] * 2


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_drafting_as_one_process(launched, one_process, hf_checkpoint, drafter_checkpoint, mode):
    """Tensor parallel: the replicated drafter reads the sliding heads gathered from the ranks.
    Pipeline: the last stage drafts, and its tokens (logits, when sampling) reach every rank.
    Either way the first draft step is the one-process one, and a drafted reply, greedy or
    sampled from the same seed, is the one-process reply on every rank."""
    from mlx_gemma import load

    model, processor = load(hf_checkpoint)
    drafter = load_drafter(drafter_checkpoint, target=model)
    alone = np.array(draft_step(drafter, model, mx.array([DRAFT_IDS]))[0])
    sampled = run_prompts(model, processor, PROMPTS[0], drafter, temp=1.0)["tokens"]
    assert sampled != one_process[str(hf_checkpoint)][0]["tokens"]  # it did sample
    for rank in launched[str(hf_checkpoint), mode]:
        assert np.abs(np.array(rank["draft_logits"]) - alone).max() < 1e-4
        assert rank["drafted"]["tokens"] == one_process[str(hf_checkpoint)][0]["tokens"]
        assert rank["sampled"]["tokens"] == sampled


def test_tokens_are_not_trivial(one_process, hf_checkpoint):
    """The long prompt's greedy reply varies, so equal token lists say something."""
    assert len(set(one_process[str(hf_checkpoint)][0]["tokens"])) > 3


def checkpoint_tensors(path: Path) -> list[str]:
    names = [sanitize(n) for f in weight_files(path) for n in read_safetensors_header(f)]
    return [n for n in names if n is not None]


def test_pipeline_ranks_read_only_their_tensors(launched, hf_checkpoint):
    names = checkpoint_tensors(hf_checkpoint)
    layer = [n for n in names if ".layers." in n]
    shared = [n for n in names if n.startswith("language_model.") and ".layers." not in n]  # embedding, norm
    media = [n for n in names if not n.startswith("language_model.")]
    r0, r1 = (r["tensors_read"] for r in launched[str(hf_checkpoint), "pipeline"])
    assert r0 + r1 == len(layer) + 2 * len(shared) + len(media)
    start, end = split_layers(ModelConfig.from_file(hf_checkpoint / "config.json").text_config, 2)[1]
    assert (start, end) == (6, 12)  # 5 sliding + 1 global each: equal cost
    assert r1 == sum(start <= int(n.split(".")[3]) < end for n in layer) + len(shared)
    tensor = [r["tensors_read"] for r in launched[str(hf_checkpoint), "tensor"]]
    assert tensor == [len(names)] * 2  # tensor parallel reads every tensor, then keeps its slices


def test_pipeline_rank_memory_is_its_share(launched, layer_heavy):
    """The weights a stage holds (MLX's peak after loading, measured in the rank's own process)
    are its share of the checkpoint, about half: the other stage's tensors are never read."""
    sizes = {}
    for f in weight_files(layer_heavy):
        for name, (dtype, shape) in read_safetensors_header(f).items():
            sizes[sanitize(name)] = 4 * int(np.prod(shape))  # float32
    total = sum(sizes.values())
    start, end = split_layers(ModelConfig.from_file(layer_heavy / "config.json").text_config, 2)[1]
    stage1 = sum(b for n, b in sizes.items() if (".layers." not in n and n.startswith("language_model."))
                 or (".layers." in n and start <= int(n.split(".")[3]) < end))
    expected = [total - stage1 + sum(b for n, b in sizes.items() if ".layers." not in n and
                                     n.startswith("language_model.")), stage1]
    peaks = [r["weights_peak"] for r in launched[str(layer_heavy), "pipeline"]]
    for peak, want in zip(peaks, expected):
        assert abs(peak - want) < 0.05 * want, (peaks, expected)  # within 5% of its tensors' bytes
        assert peak < 0.62 * total, (peaks, total)  # about 1/2 of the weights, not all of them


def test_tensor_parallel_refuses_heads_that_do_not_split():
    def config(**text):
        return ModelConfig.from_dict({"model_type": "gemma4_unified", "text_config": reference.text_config(**text)})

    check_tensor_parallel(config(), 2)  # 4 heads, 2 sliding kv heads, 1 global kv head (kept whole)
    with pytest.raises(DistributedError, match="2 key/value heads do not divide by 4"):
        check_tensor_parallel(config(), 4)
    with pytest.raises(DistributedError, match="4 attention heads do not divide by 3"):
        check_tensor_parallel(config(), 3)


def test_pipeline_split_weighs_global_layers():
    """The 12B over 2 ranks: 24 layers each (4 global each); over 3, contiguous and balanced."""
    text = ModelConfig.from_file(REPO / "tests" / "data" / "gemma-4-12B-it.config.json").text_config
    costs = layer_costs(text)
    assert costs[5] > 1.05 * costs[0]  # a global layer is heavier than a sliding one
    assert split_layers(text, 2) == [(0, 24), (24, 48)]
    thirds = split_layers(text, 3)
    assert [a for a, _ in thirds][1:] == [b for _, b in thirds][:-1] and thirds[-1][1] == 48
    shares = [sum(costs[a:b]) / sum(costs) for a, b in thirds]
    assert max(shares) - min(shares) < 0.03, shares


# --- the CLI ------------------------------------------------------------------------------------


def cli(*args):
    return [sys.executable, "-m", "mlx_gemma.generate", *args]


def test_cli_prints_once_from_rank_0(hf_checkpoint, tmp_path):
    args = ["--model", str(hf_checkpoint), "--prompt", "the a is of and " * 4, "--temp", "0", "--max-tokens", "12",
            "--verbose", "False"]
    alone = subprocess.run(cli(*args), capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr
    r = run_ranks(tmp_path, cli(*args), timeout=180)  # tensor parallel (--chat below runs --pipeline)
    assert [r[0].stdout, r[1].stdout] == [alone.stdout, ""], (r[0].stdout, r[0].stderr[-2000:])
    assert [p.returncode for p in r] == [0, 0], r[0].stderr[-2000:]  # every rank exited 0
    # Through mlx.launch, which merges the ranks' output and exits 0 only if every rank did.
    launch = subprocess.Popen([str(LAUNCH), "--backend", "ring", "-n", "2", "--", *cli(*args)], cwd=REPO,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        out, err = launch.communicate(timeout=180)
    finally:
        try:
            os.killpg(launch.pid, signal.SIGKILL)  # no rank outlives the test
        except ProcessLookupError:
            pass
    assert (launch.returncode, out) == (0, alone.stdout), err[-2000:]


def test_cli_chat_two_turns(hf_checkpoint, tmp_path):
    args = ["--model", str(hf_checkpoint), "--chat", "--temp", "0", "--max-tokens", "8", "--verbose", "False"]
    turns = "the a is\nof and the\nq\n"  # mlx.launch never passes on the end of its input: 'q' quits
    alone = subprocess.run(cli(*args), input=turns, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.count(">> ") == 3
    r = run_ranks(tmp_path, cli(*args, "--pipeline"), timeout=180, input=turns)
    assert [r[0].stdout, r[1].stdout] == [alone.stdout, ""], (r[0].stdout, r[0].stderr[-2000:])


def test_cli_plan_per_rank_and_refusal(hf_checkpoint, tmp_path):
    r = run_ranks(tmp_path, cli("--model", str(hf_checkpoint), "--plan", "--pipeline"), timeout=120)
    table = r[0].stdout.splitlines()
    assert table[0] == "| item | rank 0 | rank 1 |", r[0].stdout + r[0].stderr[-2000:]
    weights = next(line for line in table if line.startswith("| weights |")).split("|")[2:4]
    assert weights[0] != weights[1]  # each rank counts its own layers
    r = run_ranks(tmp_path, cli("--model", str(hf_checkpoint), "--memory-limit", "3MB", "--no-quantize",
                                "--prompt", "hi"), timeout=120)
    errors = [line for p in r for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and \
        "rank 0 (tensor parallel): needs " in errors[0], r[0].stderr[-2000:]
    assert r[0].stdout + r[1].stdout == ""


def start_ranks(tmp_path, rank_args, **env):
    """The ranks as mlx.launch starts them on one machine (its ring hostfile and MLX_RANK), but
    each with its own arguments and a handle the test can kill."""
    hostfile = loopback_hostfile(tmp_path / "hosts.json", len(rank_args))
    return [subprocess.Popen(cli(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile), **env))
            for r, args in enumerate(rank_args)]


def finish(procs, timeout):
    out = []
    for p in procs:
        try:
            out.append(p.communicate(timeout=timeout))
        finally:
            p.kill()
    return out


def test_mismatched_checkpoints_are_refused(tmp_path, hf_checkpoint, four_bit):
    procs = start_ranks(tmp_path, [["--model", str(m), "--prompt", "hi"] for m in (hf_checkpoint, four_bit)])
    (out0, err0), _ = finish(procs, 120)
    assert procs[0].returncode == 1
    assert err0.strip().splitlines()[-1].startswith("error: rank 1 has a different checkpoint than rank 0"), err0
    assert out0 == ""


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_survivor_names_the_failed_rank(tmp_path, hf_checkpoint, fault):
    """A rank killed (or frozen: SIGSTOP) while the others wait for it in a collective: rank 0
    exits 1 with one line naming it, well within 30 s."""
    procs = start_ranks(tmp_path, [["--model", str(hf_checkpoint), "--chat"]] * 2, MLX_GEMMA_HEARTBEAT_TIMEOUT="3")
    try:
        assert procs[0].stdout.read(3) == ">> "  # rank 0 waits for a line, rank 1 in the collective sharing it
        procs[1].send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        t = time.monotonic()
        _, err = procs[0].communicate(timeout=30)
        elapsed = time.monotonic() - t
    finally:
        for p in procs:
            p.kill()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert procs[0].returncode == 1 and len(lines) == 1, err
    cause = "rank 1 exited" if fault == "killed" else "rank 1 stopped responding (no heartbeat for 3 s)"
    assert lines[0].startswith(f"error: {cause}"), err
    assert elapsed < 30


def test_unreachable_rank_times_out(tmp_path, hf_checkpoint):
    procs = start_ranks(tmp_path, [["--model", str(hf_checkpoint), "--prompt", "hi"]] * 2,
                        MLX_GEMMA_CONNECT_TIMEOUT="3")
    procs[1].kill()  # never joins
    (_, err), _ = finish(procs, 60)
    assert procs[0].returncode != 0
    assert err.strip().splitlines()[-1].startswith("error: could not connect to the other ranks (127.0.0.1:"), err


# --- the server ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_server_on_two_ranks_answers_as_one_process(hf_checkpoint, tmp_path, mode):
    """Rank 0 serves HTTP and shares each prompt; the other rank follows step by step: replies
    equal the library's, the prefix cache is used alike on both ranks (pipeline ranks hold
    caches of different sizes), a client that hangs up mid-stream stops both ranks in step,
    and Ctrl-C (SIGINT to the group) stops every rank cleanly."""
    from test_server import Server, abandon_stream, chat, data_url, png_bytes, reference, stream_text, user
    from mlx_gemma import load

    model, processor = load(hf_checkpoint)
    flags = ["--pipeline"] if mode == "pipeline" else []
    s = Server(hf_checkpoint, tmp_path / "server.log", *flags, ranks=2)
    try:
        first = [{"role": "system", "content": "the a is of and " * 6}, user("name a colour")]
        reply, _ = chat(s, first)
        assert reply == reference(model, processor, first, 12)
        second = first + [{"role": "assistant", "content": reply}, user("and a number")]
        assert stream_text(s, second, 10) == reference(model, processor, second, 10)
        reply, usage = chat(s, second + [{"role": "assistant", "content": "x"}, user("more")], 6)
        assert usage["prompt_tokens_details"]["cached_tokens"] >= len(processor.chat_ids(second))
        abandon_stream(s.port, 400)  # both ranks stop at the same step, or the next request hangs
        (tmp_path / "a.png").write_bytes(png_bytes())
        image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(),
                                                                                                  "image/png")}},
                                              {"type": "text", "text": "describe"}]}]
        local = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "a.png")},
                                              {"type": "text", "text": "describe"}]}]
        assert chat(s, image, 6)[0] == reference(model, processor, local, 6)
        sampled = [s.request("POST", "/v1/chat/completions", {"messages": [user("hi")], "temperature": 1.0,
                                                              "seed": 3, "max_tokens": 8})[1] for _ in range(2)]
        assert sampled[0]["choices"] == sampled[1]["choices"]
        os.killpg(s.proc.pid, signal.SIGINT)
        s.wait(timeout=30)
        log = s.log_path.read_text()
        assert f"2 ranks, {mode} parallel" in log and "error" not in log, log[-3000:]
    finally:
        s.stop()
