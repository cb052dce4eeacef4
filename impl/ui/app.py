"""The chat page: a Gradio Blocks app that streams answers from the OpenAI-compatible API (project 28).

The UI holds no model. Every message becomes one ``POST /v1/chat/completions`` with ``"stream": true``, read
as server-sent events with httpx, so the same page works against one API worker, the router in front of
several, or any OpenAI-compatible server. What the page adds:

- system-prompt presets (the chat model was fine-tuned without a system turn, so "none" is the default);
- multi-turn history, trimmed to the context window by asking the server: the longest recent history it
  accepts is sent (``impl/ui/history.py``: oldest turns go first, the system prompt stays);
- generation settings (max tokens, temperature, top-p);
- Stop: Gradio cancels the running handler, whose ``async with`` closes the HTTP stream, and the server
  aborts the request (its KV blocks go back to the pool); Clear empties the conversation.

Offline-safe by construction: analytics off (set before gradio is imported, ``impl/ui/__init__.py``), a
theme on the system's own fonts, no share link, no server-side rendering (it would need Node). Gradio's
themes name Google Fonts; this version ships the files of the ones its themes use and fetches any other
from fonts.googleapis.com, so naming no web font at all keeps a theme or version change from bringing a
fetch back (tests/test_ui.py counts the page's requests in Chromium; a theme on ``GoogleFont("Lobster")``
fails it).
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import gradio as gr
import httpx

from impl.ui.history import Message, candidate_prompts

PRESETS = {
    "None (as fine-tuned)": "",
    "Helpful assistant": "You are a helpful assistant. Answer the question clearly and correctly.",
    "Concise": "You are a helpful assistant. Answer in as few words as possible.",
    "Shakespearean": "You are a helpful assistant who answers in the style of Shakespeare's plays.",
}
# Prompts from the instruction set the chat model was tuned on (impl/sft/tasks.py): instruction, then input.
EXAMPLES = ["Reverse the letters of the word.\nlemon", "Add the two numbers.\n17 25",
            "Sort the words alphabetically.\nzebra apple mirror"]
# Only local fonts: a theme naming a Google font Gradio does not ship makes every page load fetch it.
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]
# Error codes (or words in the message) by which OpenAI-style servers refuse a prompt longer than the window.
TOO_LONG_CODES = {"context_length_exceeded", "prompt_too_long"}


class ApiError(Exception):
    """The API answered with an error: the HTTP status and the OpenAI-shaped error's message and code."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"API error {status}: {message}")
        self.status, self.message, self.code = status, message, code

    @classmethod
    def from_body(cls, status: int, body: bytes) -> ApiError:
        try:
            error = json.loads(body)["error"]
            return cls(status, str(error.get("message")), error.get("code"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(status, body.decode("utf-8", "replace")[:300] or "(empty body)")

    @property
    def prompt_too_long(self) -> bool:
        """The server refused the prompt as too long for the context window (so fewer turns may fit)."""
        return self.status == 400 and (self.code in TOO_LONG_CODES or "too long" in self.message.lower())


@dataclass
class Settings:
    """What one request asks of the model."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95


async def stream_chat(client: httpx.AsyncClient, model: str, messages: list[Message],
                      settings: Settings) -> AsyncIterator[str]:
    """The answer's text pieces as the server streams them (OpenAI chunk schema, ``data: [DONE]`` ends it).
    Raises ``ApiError`` when the server refuses the request or reports an error inside the stream."""
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": int(settings.max_tokens),
            "temperature": float(settings.temperature), "top_p": float(settings.top_p)}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise ApiError.from_body(response.status_code, await response.aread())
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators and SSE comments
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ApiError(response.status_code, str(chunk["error"].get("message")), chunk["error"].get("code"))
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text


def _text(content: Any) -> str:
    """A chat message's text, whether Gradio hands it over as a string or as a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text(part) for part in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "" if content is None else str(content)


def build_ui(api_url: str, api_key: str | None = None, settings: Settings | None = None,
             request_timeout_s: float = 600.0) -> gr.Blocks:
    """The chat page as a ``gr.Blocks`` (not launched: ``launch_ui`` or ``python -m impl.ui`` serves it).
    ``api_url`` is the API's base URL (``http://127.0.0.1:8000``, no ``/v1``); ``api_key`` is sent as a
    bearer token and never shown or logged; ``settings`` are the sliders' starting values."""
    settings = settings or Settings()
    base = api_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    served: dict[str, str] = {}  # the model id, asked of /v1/models once

    def client() -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(request_timeout_s, connect=10))

    async def model_id(http: httpx.AsyncClient) -> str:
        if "id" not in served:
            response = await http.get("/v1/models")
            if response.status_code != 200:
                raise ApiError.from_body(response.status_code, response.content)
            served["id"] = response.json()["data"][0]["id"]
        return served["id"]

    streaming: dict[str, httpx.AsyncClient] = {}  # session -> the client of its answer in progress

    async def stop_streaming(request: gr.Request):
        """Close the session's HTTP stream: the server sees the disconnect and frees the request's blocks at
        once. (Gradio's ``cancels`` alone stops the handler, but its generator, and so the connection, may
        only be closed later by the garbage collector: the server would generate the whole answer.)"""
        http = streaming.pop(request.session_hash or "", None)
        if http is None:
            return gr.skip()  # nothing was streaming: the status line stays as it is
        await http.aclose()
        return "Stopped: the answer so far stays in the conversation."

    async def respond(message: str, history: list[Message], system: str, max_tokens: float, temperature: float,
                      top_p: float, request: gr.Request) -> AsyncIterator[tuple]:
        """Stream one answer. Yields (chatbot, history, message box, status); the history gains the turn
        as it streams, so a stopped answer stays in the conversation as far as it got."""
        session = request.session_hash or ""
        history = [{"role": m["role"], "content": _text(m["content"])} for m in history or []]
        if not message.strip():
            yield history, history, message, "Type a message first."
            return
        asked = Settings(int(max_tokens), float(temperature), float(top_p))
        number = 1 + sum(m["role"] == "user" for m in history)  # the turn's number, in every status line
        turn = [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield history + turn, history, "", f"Turn {number}: waiting for the first token..."
        http = None
        try:
            async with client() as http:
                streaming[session] = http
                model = await model_id(http)
                candidates = list(candidate_prompts(system, history, message))
                for n_tried, messages in enumerate(candidates, 1):
                    try:
                        async for piece in stream_chat(http, model, messages, asked):
                            turn[1]["content"] += piece
                            shown = history + [dict(m) for m in turn]
                            yield shown, shown, "", _status(number, model, n_tried - 1, streaming=True)
                    except ApiError as error:
                        if error.prompt_too_long and n_tried < len(candidates) and not turn[1]["content"]:
                            continue  # one more of the oldest turns out, and ask again
                        raise
                    shown = history + [dict(m) for m in turn]
                    yield shown, shown, "", _status(number, model, n_tried - 1, streaming=False)
                    return
        except (ApiError, httpx.HTTPError, RuntimeError) as error:  # RuntimeError: the client closed by Stop
            if streaming.get(session) is not http:
                return  # stopped: the stop handler owns the status line
            kept = history + ([dict(m) for m in turn] if turn[1]["content"] else [])
            yield kept, kept, "" if turn[1]["content"] else message, f"Turn {number}: error: {error}"
        finally:
            if streaming.get(session) is http:
                del streaming[session]

    with gr.Blocks(title="Hands-On LLM chat", analytics_enabled=False) as ui:
        gr.Markdown(f"### Hands-On LLM chat\nStreaming from `{base}` (OpenAI-compatible API).")
        history = gr.State([])
        with gr.Row():
            preset = gr.Dropdown(list(PRESETS), value=next(iter(PRESETS)), label="System prompt preset", scale=1)
            system = gr.Textbox(value=next(iter(PRESETS.values())), label="System prompt", lines=1, scale=3,
                                elem_id="system-prompt")
        chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=400, buttons=["copy", "copy_all"],
                             feedback_options=None, render_markdown=False)  # the model writes plain text
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            box = gr.Textbox(placeholder="Type a message; Enter sends, Shift+Enter starts a new line",
                             show_label=False, lines=1, scale=5, elem_id="message")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            clear = gr.Button("Clear", scale=1, elem_id="clear")
        gr.Examples(EXAMPLES, inputs=box, label="Tasks the chat model was tuned on")
        with gr.Accordion("Generation settings", open=False):
            max_tokens = gr.Slider(1, max(4096, settings.max_tokens), value=settings.max_tokens, step=1,
                                   label="Max tokens")
            temperature = gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05, label="Temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="Top-p")

        inputs = [box, history, system, max_tokens, temperature, top_p]
        outputs = [chatbot, history, box, status]
        sent = send.click(respond, inputs, outputs, api_name="send", concurrency_limit=None)
        entered = box.submit(respond, inputs, outputs, api_name=False, concurrency_limit=None)
        stop.click(stop_streaming, None, status, cancels=[sent, entered], api_name=False)
        clear.click(lambda: ([], [], ""), None, [chatbot, history, status], cancels=[sent, entered],
                    api_name="clear")
        preset.change(lambda name: PRESETS[name], preset, system, api_name=False)
    return ui


def _status(number: int, model: str, dropped_turns: int, streaming: bool) -> str:
    note = f" {dropped_turns} oldest turn(s) left out to fit the context window." if dropped_turns else ""
    return f"Turn {number}: {'streaming from' if streaming else 'answered by'} `{model}`.{note}"


def theme() -> gr.themes.Base:
    """Gradio's default look on the system's fonts (no web font, so nothing to fetch from the internet)."""
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def launch_ui(ui: gr.Blocks, host: str = "127.0.0.1", port: int = 7860) -> str:
    """Serve ``ui`` on ``host:port`` (0: a free port) in a background thread and return its URL
    (``ui.block_thread()`` waits on it; ``ui.close()`` stops it). Never a share link."""
    if port == 0:  # Gradio cannot bind port 0 itself (it polls the URL it was given): ask the OS for one
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    ui.queue(default_concurrency_limit=None)
    _, url, _ = ui.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True,
                          theme=theme(), ssr_mode=False, footer_links=[], pwa=False, mcp_server=False)
    return (url or f"http://{host}:{port}/").rstrip("/")
