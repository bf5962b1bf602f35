"""The demo (`python -m devkit.demo`, what `make run` starts) as a real process: ready banner, every
packaged model answering the official OpenAI client, Ctrl-C."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from openai import OpenAI

from devkit.model_files import ModelFiles
from devkit.ports import free_port
from tests.fixtures.models import SENTENCE, assert_heard
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.slow
READY_WITHIN_S = 240.0


def _lines(stream: object, into: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)
    into.put(None)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_demo(home: Path) -> tuple[subprocess.Popen[str], str, tuple[int, int, int]]:
    """The demo started on free ports in ``home``, once it printed its ready banner (returned)."""
    grpc_port, http_port, node_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "devkit.demo", "--home", str(home),
            "--grpc-listen", f"127.0.0.1:{grpc_port}", "--http-listen", f"127.0.0.1:{http_port}",
            "--node-listen", f"127.0.0.1:{node_port}", "--timeout", str(READY_WITHIN_S),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    out: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + READY_WITHIN_S + 60
    try:
        while not (seen and seen[-1].startswith("ready: Ctrl-C")):
            try:
                line = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("no ready banner in time:\n" + "".join(seen))
            assert line is not None, "the demo exited before it was ready:\n" + "".join(seen)
            seen.append(line)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, "".join(seen), (grpc_port, http_port, node_port)


def test_the_demo_serves_every_packaged_model_to_an_openai_client_and_stops_on_ctrl_c(
    tmp_path: Path, gemma: ModelFiles, whisper: ModelFiles, piper: ModelFiles
) -> None:
    home = tmp_path / "home"
    proc, banner, (grpc_port, http_port, node_port) = _start_demo(home)
    try:
        base_url = re.search(r"^\s+base_url\s+(\S+)$", banner, re.M)
        api_key = re.search(r"^\s+api_key\s+(\S+)$", banner, re.M)
        assert base_url and api_key, banner
        assert base_url.group(1) == f"http://127.0.0.1:{http_port}/v1"
        assert (home / "demo" / "logs" / "balancer.log").exists() and "balancer.log" in banner

        client = OpenAI(base_url=base_url.group(1), api_key=api_key.group(1), timeout=120, max_retries=0)
        chat = client.chat.completions.create(
            model="gemma-3-270m",
            messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=8,
            temperature=0,
        )
        assert chat.choices[0].message.content and chat.choices[0].message.content.strip()
        completion = client.completions.create(
            model="gemma-3-270m", prompt="One, two, three, four,", max_tokens=6, temperature=0
        )
        assert completion.choices[0].text.strip()
        embeddings = client.embeddings.create(model="gemma-3-270m", input=["a red fox", "a lazy dog"])
        vectors = [e.embedding for e in embeddings.data]
        assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0 and vectors[0] != vectors[1]

        # Speech and transcription round trip: the demo's voice speaks, whisper hears the same words.
        speech = client.audio.speech.create(
            model="piper-en-us-joe-medium", voice="joe", input=SENTENCE, response_format="wav"
        )
        assert speech.content[:4] == b"RIFF", speech.content[:64]
        heard = client.audio.transcriptions.create(
            model="whisper-base", file=("speech.wav", speech.content, "audio/wav")
        ).text
        assert_heard(heard, SENTENCE)
        # The banner's sample clip (spoken through the demo when it started) transcribes too.
        sample = re.search(r"file=@(\S+\.wav)", banner)
        assert sample, banner
        assert f"{base_url.group(1)}/audio/speech" in banner and "piper-en-us-joe-medium" in banner
        with open(sample.group(1), "rb") as audio:
            assert_heard(client.audio.transcriptions.create(model="whisper-base", file=audio).text, SENTENCE)
        # The shared dir is used in place: the node's own models dir holds no copy.
        assert not list((home / "demo" / "node").rglob("*.gguf"))

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not _listening(grpc_port) and not _listening(http_port) and not _listening(node_port)

        # A second run in the same home (what `make run` does again): the node keeps its id, which the
        # new node key takes over, and answers.
        proc, banner, (grpc_port, http_port, node_port) = _start_demo(home)
        again = re.search(r"^\s+api_key\s+(\S+)$", banner, re.M)
        assert again, banner
        client = OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=again.group(1), timeout=120)
        second = client.completions.create(model="gemma-3-270m", prompt="One, two,", max_tokens=4)
        assert second.choices[0].text.strip()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(home / "demo" / "shared", ignore_errors=True)  # 400 MB of models, rebuilt per run
