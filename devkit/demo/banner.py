"""What the demo prints once everything is ready: where things are and how to call each model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from devkit.packaged_models import GEMMA, PIPER, WHISPER


@dataclass(frozen=True, slots=True)
class DemoDirs:
    """The demo's files under ``<home>/demo``."""

    root: Path

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def balancer(self) -> Path:
        return self.root / "balancer"

    @property
    def node(self) -> Path:
        return self.root / "node"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def sample(self) -> Path:
        return self.root / "hello.wav"


def banner(
    *, base_url: str, api_key: str, grpc_addr: str, node_id: str, node_addr: str, dirs: DemoDirs, sample: str
) -> str:
    """The ready banner; the demo's test reads its ``base_url``, ``api_key`` and ``file=@…wav`` lines."""
    return f"""
llmlb demo: a balancer and one node serving {GEMMA}, {WHISPER} and {PIPER}

  base_url   {base_url}
  api_key    {api_key}
  grpc       {grpc_addr}    (node {node_id} on {node_addr})
  logs       {dirs.logs / "balancer.log"}
             {dirs.logs / "node.log"}
  models     {dirs.shared}  (the node's shared dir, used in place)

Chat (gemma-3-270m is a small base model: expect playful, not wise, answers):

  curl {base_url}/chat/completions \\
    -H "Authorization: Bearer {api_key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{GEMMA}", "max_tokens": 32,
         "messages": [{{"role": "user", "content": "Name three colours."}}]}}'

Embeddings:

  curl {base_url}/embeddings \\
    -H "Authorization: Bearer {api_key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{GEMMA}", "input": "The quick brown fox"}}'

Speech (a WAV file):

  curl {base_url}/audio/speech \\
    -H "Authorization: Bearer {api_key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{PIPER}", "input": "Hello from llmlb.", "response_format": "wav"}}' \\
    -o speech.wav

Transcription:

  curl {base_url}/audio/transcriptions \\
    -H "Authorization: Bearer {api_key}" -F model={WHISPER} -F file=@{sample}

Python (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="{base_url}", api_key="{api_key}")
  chat = client.chat.completions.create(
      model="{GEMMA}", max_tokens=32, messages=[{{"role": "user", "content": "Name three colours."}}]
  )
  print(chat.choices[0].message.content)
  speech = client.audio.speech.create(
      model="{PIPER}", voice="joe", input="Hello from llmlb.", response_format="wav"
  )
  speech.write_to_file("speech.wav")
  with open("speech.wav", "rb") as audio:
      print(client.audio.transcriptions.create(model="{WHISPER}", file=audio).text)

The operator CLI, in another terminal:

  export LLMLB_ADDR={grpc_addr} LLMLB_API_KEY={api_key}
  llmlb models list; llmlb nodes list; llmlb keys list

ready: Ctrl-C stops the balancer and the node.
"""
