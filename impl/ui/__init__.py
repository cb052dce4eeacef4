"""Project 30: a Gradio chat page that streams from the OpenAI-compatible API (``impl/serving``).

    python -m impl.ui --api http://127.0.0.1:8000 [--port 7860] [--api-key KEY]

In code: ``from impl.ui.app import build_ui, launch_ui``; ``impl.ui.history`` is the history trimming alone
(no gradio). Gradio's analytics are switched off here, before anything imports gradio: it reads the
variable at import time, and an offline machine must not try to phone home.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
