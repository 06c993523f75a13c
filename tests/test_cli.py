"""`python -m mlx_gemma.generate` as a user runs it: output, stats block, chat, bad input."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_gemma.generation import ChatSession, generate

REPO = Path(__file__).resolve().parent.parent
STATS = re.compile(r"==========\nPrompt: (\d+) tokens, [\d.]+ tokens-per-sec\n"
                   r"Generation: (\d+) tokens, [\d.]+ tokens-per-sec\nPeak memory: [\d.]+ GB\n$")


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "mlx_gemma.generate", *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_generates_like_the_api_and_prints_stats(hf_checkpoint, model, processor):
    run = run_cli("--model", str(hf_checkpoint), "--prompt", "hello world", "--temp", "0",
                  "--max-tokens", "12")
    assert run.returncode == 0, run.stderr
    stats = STATS.search(run.stdout)
    assert stats, run.stdout
    text = run.stdout[:stats.start()].removesuffix("\n")
    assert text == generate(model, processor, "hello world", temp=0.0, max_tokens=12)
    assert int(stats.group(1)) == len(processor.prompt_ids("hello world"))
    assert 1 <= int(stats.group(2)) <= 12


@pytest.mark.parametrize("flags, kwargs", [
    (["--no-chat-template"], dict(chat_template=False)),
    (["--system", "be brief"], dict(system="be brief")),
    (["--enable-thinking"], dict(enable_thinking=True)),
])
def test_prompt_flags_change_the_prompt_tokens(hf_checkpoint, processor, flags, kwargs):
    run = run_cli("--model", str(hf_checkpoint), "--prompt", "hi", "--max-tokens", "1", *flags)
    assert run.returncode == 0, run.stderr
    assert int(STATS.search(run.stdout).group(1)) == len(processor.prompt_ids("hi", **kwargs))


def test_enable_thinking_reaches_the_template(processor):
    think = processor.tokenizer.convert_tokens_to_ids("<|think|>")
    assert think in processor.prompt_ids("hi", enable_thinking=True)
    assert think not in processor.prompt_ids("hi")


def test_chat_keeps_the_conversation(hf_checkpoint, model, processor):
    run = run_cli("--model", str(hf_checkpoint), "--chat", "--temp", "0", "--max-tokens", "8",
                  stdin="hello there\nand then?\nq\n")
    assert run.returncode == 0, run.stderr
    chat = ChatSession(model, processor)
    replies = ["".join(r.text for r in chat.send(m, temp=0.0, max_tokens=8) if not r.thinking)
               for m in ("hello there", "and then?")]
    assert run.stdout == ">> " + replies[0] + "\n>> " + replies[1] + "\n>> "


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "0"], "error: --max-tokens: must be a positive number, got 0"),
    (["--max-tokens", "-5"], "error: --max-tokens: must be a positive number, got -5"),
    (["--prompt", "x" * 600], "error: prompt: needs {n} tokens, more than the model's context of 512 tokens"),
])
def test_bad_generation_input(hf_checkpoint, processor, args, message):
    message = message.format(n=len(processor.prompt_ids("x" * 600)))
    run = run_cli("--model", str(hf_checkpoint), *args)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in run.stderr


def test_bad_model_path_is_one_line(tmp_path):
    run = run_cli("--model", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert run.returncode == 1
    assert run.stderr.strip() == f"error: {tmp_path / 'nowhere'}: neither a local directory nor a " \
                                 "Hugging Face repo id (owner/name)"


MEDIA_STATS = re.compile(r"Prompt: (\d+) tokens, [\d.]+ tokens-per-sec\nMedia: image (\d+), audio (\d+) tokens; "
                         r"preprocessing [\d.]+ s, prefill [\d.]+ s\nGeneration: ")


def test_media_flags_reach_the_prompt_and_the_stats(hf_checkpoint, model, processor, tmp_path):
    import media_files as mf
    from PIL import Image

    from mlx_gemma.prompt import MediaOptions, user_content

    img, wav = tmp_path / "a.png", mf.write_wav(tmp_path / "a.wav", 44100, 0.5)
    Image.fromarray(mf.noise_image(200, 300)).save(img)
    run = run_cli("--model", str(hf_checkpoint), "--prompt", "what?", "--image", str(img), "--audio", str(wav),
                  "--image-budget", "140", "--temp", "0", "--max-tokens", "6")
    assert run.returncode == 0, run.stderr
    stats = MEDIA_STATS.search(run.stdout)
    assert stats, run.stdout
    content = user_content("what?", [str(img)], [str(wav)])
    inputs = processor.chat_inputs([{"role": "user", "content": content}], options=MediaOptions(image_budget=140))
    counts = inputs.token_counts()
    assert (int(stats.group(1)), int(stats.group(2)), int(stats.group(3))) == \
           (len(inputs.ids), counts["image"], counts["audio"])
    text = run.stdout[:run.stdout.index("==========")].removesuffix("\n")
    assert text == generate(model, processor, inputs, temp=0.0, max_tokens=6)


def test_chat_takes_media_in_a_later_turn(hf_checkpoint, model, processor, tmp_path):
    import media_files as mf
    from PIL import Image

    img = tmp_path / "b.png"
    Image.fromarray(mf.noise_image(100, 100)).save(img)
    run = run_cli("--model", str(hf_checkpoint), "--chat", "--temp", "0", "--max-tokens", "5",
                  "--image-budget", "70", stdin=f"hello\n/image {img}\nand this?\nq\n")
    assert run.returncode == 0, run.stderr
    from mlx_gemma.prompt import MediaOptions

    chat = ChatSession(model, processor, media_options=MediaOptions(image_budget=70))
    first = "".join(r.text for r in chat.send("hello", temp=0.0, max_tokens=5) if not r.thinking)
    second = "".join(r.text for r in chat.send("and this?", image=[str(img)], temp=0.0, max_tokens=5)
                     if not r.thinking)
    assert chat.reused_tokens > 0  # the first turn stayed cached
    assert run.stdout == ">> " + first + "\n>> >> " + second + "\n>> "


def test_more_media_than_the_context_is_one_line(hf_checkpoint, tmp_path):
    import media_files as mf
    from PIL import Image

    img = tmp_path / "big.png"
    Image.fromarray(mf.noise_image(1000, 1000)).save(img)
    run = run_cli("--model", str(hf_checkpoint), "--image", str(img), "--image", str(img), "--image-budget", "280")
    assert run.returncode == 1
    assert re.fullmatch(r"error: prompt: needs (\d+) tokens \((\d+) of them for media\), more than the model's "
                        r"context of 512 tokens", run.stderr.strip().splitlines()[-1]), run.stderr
    assert "Traceback" not in run.stderr
