"""Project 30 claims: the chat page driven in a real headless Chromium against a real API server on loopback.

One session serves all three claims (the bench runs a spec's claims in one worker process): an API worker
(``python -m impl.serving api``) and the page (``python -m impl.ui``) as subprocesses, Debian's Chromium
through selenium and chromedriver, scripted conversations typed into the page. In the page a
MutationObserver stamps every change of the last answer's length with ``performance.now()``, so the time to
the first token is the browser's own clock from the click on Send to the first character drawn, and
"streamed" means the answer was drawn at several lengths before its last. Chrome's performance log lists
every request the page made; a request to any host other than loopback counts as leaving the machine.

Also used by tests/test_ui.py (``chat_stack``, ``ChatPage``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from harness.measure import Context, Image, NotApplicable, Result, quartiles
from impl.serving.testing import read_url, stop_process_group

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
LOCAL_SCHEMES = {"data", "blob", "about", "chrome", "chrome-extension", "devtools"}
UI_URL = re.compile(r"ui on (http://\S+)")
# Records (ms since page load, answers on the page, length of the last answer's text) at every change.
OBSERVER_JS = """
const root = document.querySelector('#chatbot');
window.__answers = [];
const look = () => {
  const bots = root.querySelectorAll('.bot');
  const n = bots.length, len = n ? bots[n - 1].innerText.length : -1;
  const last = window.__answers[window.__answers.length - 1];
  if (!last || last[1] !== n || last[2] !== len) window.__answers.push([performance.now(), n, len]);
};
new MutationObserver(look).observe(root, {subtree: true, childList: true, characterData: true});
"""


def browser_missing() -> str | None:
    """Why no browser test can run here (Chromium or its driver absent), or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (Debian: apt-get install chromium chromium-driver)"
    return None


@contextlib.contextmanager
def running_ui(api_url: str, *args: str, timeout_s: float = 90.0) -> Iterator[str]:
    """``python -m impl.ui --api API_URL --port 0 *args`` as a subprocess; yields the page's URL once it
    answers, then stops it (its whole process group)."""
    proc = subprocess.Popen([sys.executable, "-m", "impl.ui", "--api", api_url, "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = read_url(proc, timeout_s, UI_URL)
        httpx.get(url, timeout=30).raise_for_status()
        yield url
    finally:
        stop_process_group(proc)


@contextlib.contextmanager
def chat_stack(model: str, *ui_args: str) -> Iterator[tuple[str, str]]:
    """An API worker serving ``model`` and the chat page in front of it: yields ``(api_url, ui_url)``."""
    from impl.serving.testing import running_server

    with running_server(["api", "--model", model]) as api, running_ui(api, *ui_args) as ui:
        yield api, ui


class ChatPage:
    """The chat page in headless Chromium (selenium + chromedriver), with every request it makes logged."""

    def __init__(self, url: str, width: int = 1100, height: int = 900) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        options = Options()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={width},{height}", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync"):
            options.add_argument(arg)
        # the page's own requests only (what Network.requestWillBeSent reports for its frames and workers)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.url, self.requested = url, []

    def close(self) -> None:
        self.driver.quit()

    def open(self, timeout_s: float = 60.0) -> float:
        """Load the page and wait until every control the script uses is drawn; returns the seconds it took."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        start = time.perf_counter()
        self.driver.get(self.url)
        controls = ("#message textarea", "#send", "#stop", "#clear", "#chatbot", "#status")
        WebDriverWait(self.driver, timeout_s).until(
            lambda d: all(d.find_elements(By.CSS_SELECTOR, css) for css in controls))
        self.driver.execute_script(OBSERVER_JS)
        return time.perf_counter() - start

    def answers(self) -> list[str]:
        """The assistant's messages on the page, oldest first."""
        from selenium.webdriver.common.by import By

        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, "#chatbot .bot")]

    def status(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, "#status").text

    def send(self, text: str) -> float:
        """Type ``text`` and click Send; returns the click's ``performance.now()`` (ms) in the page."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        box = self.driver.find_element(By.CSS_SELECTOR, "#message textarea")
        box.clear()
        for i, line in enumerate(text.split("\n")):
            if i:  # Enter alone would send the message so far: a new line is Shift+Enter, as a user types it
                box.send_keys(Keys.SHIFT, Keys.ENTER, Keys.NULL)
            box.send_keys(line)
        return self.driver.execute_script("const t = performance.now(); document.querySelector('#send').click();"
                                          " return t;")

    def stop(self) -> None:
        self.driver.execute_script("document.querySelector('#stop').click();")

    def wait_turn(self, number: int, timeout_s: float = 120.0) -> str:
        """Wait until the status line says turn ``number`` was answered (or failed); returns that line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status()
            if f"Turn {number}: answered" in status or f"Turn {number}: error" in status:
                return status[status.index(f"Turn {number}:"):]
            time.sleep(0.05)
        raise TimeoutError(f"turn {number} did not end within {timeout_s} s; the page says {self.status()!r}")

    def growth(self, answer_index: int, since_ms: float) -> list[tuple[float, int]]:
        """``(ms after since_ms, length)`` of answer number ``answer_index`` (0-based) each time it changed."""
        log = self.driver.execute_script("return window.__answers;")
        mine = [(t - since_ms, n_chars) for t, n, n_chars in log if t >= since_ms and n == answer_index + 1]
        # While Svelte re-renders the list, the observer can catch a half-built DOM in which the last bubble
        # is an older message; the answer's own life starts when its empty bubble appears.
        empty = next((i for i, (_, n_chars) in enumerate(mine) if n_chars == 0), 0)
        return mine[empty:]

    def screenshot(self) -> bytes:
        return self.driver.get_screenshot_as_png()

    def requests(self) -> list[str]:
        """Every URL the page has requested so far (Chrome's performance log, drained and kept)."""
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.requested.append(message["params"]["request"]["url"])
        return list(self.requested)


def leaving_machine(urls: list[str]) -> list[str]:
    """The URLs that go to a host other than this machine's loopback (data:, blob: and the like stay local)."""
    out = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme in LOCAL_SCHEMES:
            continue
        if parts.hostname not in LOCAL_HOSTS:
            out.append(url)
    return out


def converse(page: ChatPage, messages: list[str], timeout_s: float = 120.0) -> list[dict]:
    """Send ``messages`` one after the other on ``page`` (a conversation); per turn: the time to the first
    character drawn (s), the distinct lengths the answer was drawn at, the final text and the status."""
    turns = []
    for message in messages:
        n_before = len(page.answers())
        sent_ms = page.send(message)
        status = page.wait_turn(n_before + 1, timeout_s)
        growth = page.growth(n_before, sent_ms)
        drawn = [(t, n) for t, n in growth if n > 0]
        answer = page.answers()[n_before] if len(page.answers()) > n_before else ""
        turns.append({"message": message, "status": status, "answer": answer,
                      "ttft_s": drawn[0][0] / 1000 if drawn else None,
                      "lengths": sorted({n for _, n in drawn})})
    return turns


def replay(api_url: str, messages: list[str], max_tokens: int, api_key: str | None = None,
           with_tokens: bool = False) -> list:
    """The conversation's answers straight from the API (greedy, not streamed), each turn sent with the whole
    history before it, less its oldest turns while the API refuses the prompt as longer than its context:
    what the page must show if it carried the history (written apart from impl/ui's trimming, which a spec
    check verifies). ``with_tokens``: ``(text, number of tokens shown)`` pairs (the stop token is not shown)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = httpx.get(f"{api_url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    turns: list[list[dict]] = []  # [question, answer] pairs, oldest first
    answers = []
    for message in messages:
        question = {"role": "user", "content": message}
        for start in range(len(turns) + 1):
            sent = [m for turn in turns[start:] for m in turn] + [question]
            body = {"model": model, "messages": sent, "max_tokens": max_tokens, "temperature": 0}
            response = httpx.post(f"{api_url}/v1/chat/completions", json=body, headers=headers, timeout=300)
            too_long = response.status_code == 400 and "context_length_exceeded" in response.text
            if not too_long or start == len(turns):
                break
        if response.status_code != 200:
            raise RuntimeError(f"the API refused turn {len(turns) + 1} of the replay: {response.text[:300]}")
        answer = response.json()
        choice = answer["choices"][0]
        shown = answer["usage"]["completion_tokens"] - (choice["finish_reason"] == "stop")  # <|end|> is not shown
        answers.append((choice["message"]["content"], shown))
        turns.append([question, {"role": "assistant", "content": answers[-1][0]}])
    return answers if with_tokens else [text for text, _ in answers]


def same_text(shown: str, text: str) -> bool:
    """The page shows ``text`` (the browser's innerText folds runs of white space)."""
    return shown.split() == text.split()


def streamed(turn: dict) -> bool:
    """The turn ended ("answered") with the answer the API gives to the whole conversation so far (the history
    was carried), drawn in the page at two or more lengths (it arrived streamed, not at once); an answer of
    fewer than two visible tokens (the model may end its turn at once) cannot show streaming, only match."""
    return (": answered by" in turn["status"] and turn.get("as_replayed", False)
            and len(turn["lengths"]) >= min(2, turn.get("tokens", 2)))


def pick_model(quick: bool, workdir: Path) -> tuple[str, str]:
    """``(model argument, why)``: quick: the tiny chat model; full: ``chat`` if cached, else ``bpe-base`` if
    cached, else the tiny model (never a multi-hour build from inside a bench)."""
    if not quick:
        from impl import model_cache, zoo  # noqa: F401  (importing the zoo registers the names)

        for name in ("chat", "bpe-base"):
            if model_cache.state(name) == "cached":
                return name, f"the zoo's {name} model (cached)"
    from impl.serving.tiny import save_tiny_chat_model

    path = save_tiny_chat_model(workdir / "tiny-chat", block_size=4096)
    why = "the tiny chat model (random weights)" + ("" if quick else ": neither chat nor bpe-base is cached")
    return str(path), why


# Prompts from the instruction set the chat model was tuned on (impl/sft/tasks.py), chosen for long answers: a
# one-token answer cannot be seen streaming, whatever the page does.
CONVERSATIONS = [
    ["Sort the words alphabetically.\nzebra apple mirror candle river stone bread horse",
     "Write the phrase in capital letters.\nthe river runs past the stone castle in winter"],
    ["Put the words in alphabetical order.\nviolin meadow falcon anchor quilt honey walnut",
     "Reverse the letters of the word.\ncaterpillar",
     "Convert the phrase to uppercase.\nhoney and lemon in a silver kettle"],
    ["Write the word backwards.\ngrasshopper",
     "Sort the words alphabetically.\nparrot goblet harbor donkey cactus insect marble"],
]

_SESSION: dict = {}


def browser_session(ctx: Context) -> dict:
    """Run the scripted conversations once per (mode, device) in this worker; every claim reads the result."""
    key = (ctx.quick, ctx.device)
    if key in _SESSION:
        return _SESSION[key]
    if (missing := browser_missing()) is not None:
        raise NotApplicable(missing)
    import tempfile

    conversations = CONVERSATIONS[:2] if ctx.quick else CONVERSATIONS
    max_tokens = 64 if ctx.quick else 256
    with tempfile.TemporaryDirectory() as tmp:
        model, why = pick_model(ctx.quick, Path(tmp))
        with chat_stack(model, "--temperature", "0", "--max-tokens", str(max_tokens)) as (api_url, ui_url):
            results, load_s, shot, urls = [], [], b"", []
            for messages in conversations:
                page = ChatPage(ui_url)
                try:
                    load_s.append(page.open())
                    turns = converse(page, messages)
                    shot = page.screenshot()
                    urls += page.requests()
                finally:
                    page.close()
                for turn, (want, n_tokens) in zip(turns, replay(api_url, messages, max_tokens, with_tokens=True),
                                                  strict=True):
                    # an answer of white space alone is drawn as nothing: it has no token to see arrive
                    turn["as_replayed"], turn["tokens"] = same_text(turn["answer"], want), n_tokens * bool(want.strip())
                results.append(turns)
    _SESSION[key] = {"model": why, "conversations": results, "load_s": load_s, "png": shot, "urls": urls}
    return _SESSION[key]


def _session_details(session: dict) -> dict:
    turns = [t for c in session["conversations"] for t in c]
    return {"model": session["model"], "conversations": len(session["conversations"]), "turns": len(turns),
            "page_load_s": [round(s, 2) for s in session["load_s"]],
            "requests_by_page": len(session["urls"]),
            "turn_log": [{"message": t["message"][:40], "answer": t["answer"][:60], "status": t["status"][:120],
                          "ttft_s": t["ttft_s"], "lengths_drawn": len(t["lengths"]),
                          "as_replayed": t.get("as_replayed"), "tokens": t.get("tokens")} for t in turns]}


def browser_conversations(ctx: Context) -> Result:
    """Fraction of scripted multi-turn conversations in which every answer arrived streamed."""
    session = browser_session(ctx)
    if not any(t.get("tokens", 0) >= 2 for c in session["conversations"] for t in c):
        raise AssertionError("no answer had two tokens or more: nothing could show streaming")
    ok = [all(streamed(t) for t in c) for c in session["conversations"]]
    return Result(sum(ok) / len(ok), "fraction", details=_session_details(session),
                  images=[Image.from_png("the chat page in headless Chromium", session["png"])])


def browser_ttft(ctx: Context) -> Result:
    """Median seconds from the click on Send to the first character of the answer drawn in the page."""
    session = browser_session(ctx)
    ttft = [t["ttft_s"] for c in session["conversations"] for t in c if t["ttft_s"] is not None]
    if not ttft:
        raise AssertionError("no answer was ever drawn in the page: no time to first token to report")
    q1, median, q3 = quartiles(ttft)
    details = _session_details(session) | {"ttft_s_all": [round(t, 3) for t in ttft],
                                           "ttft_s_max": round(max(ttft), 3), "ttft_s_mean": statistics.mean(ttft)}
    return Result(median, "s", (q1, q3), details=details)


def requests_leaving(ctx: Context) -> Result:
    """Requests the page made to hosts other than loopback while it loaded and chatted (Chrome's count)."""
    session = browser_session(ctx)
    away = leaving_machine(session["urls"])
    details = _session_details(session) | {"leaving": away[:20],
                                           "hosts_seen": sorted({urlsplit(u).netloc for u in session["urls"]})}
    return Result(float(len(away)), "requests", details=details)
