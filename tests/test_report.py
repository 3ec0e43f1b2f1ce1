"""report.html is self-contained, escapes what the model wrote, and is drawn from whatever records a run has."""
import base64
import json
import re

from scratchpad.cluster.report import write_report


def _history(steps: int) -> list[dict]:
    return [{"step": s, "wall": 30.0 + 5 * s, "reward": 0.1 * s, "accuracy": 0.1 * s, "tokens_per_s": 1000.0 + s,
             "loss": 0.01, "time_generate": 1.0, "time_train": 0.5, "policy_version": s} for s in range(1, steps + 1)]


def _evals() -> list[dict]:
    return [{"step": 0, "wall": 20.0, "accuracy": 0.25, "by_length": {"3": 0.5, "4": 0.0}},
            {"step": 4, "wall": 60.0, "accuracy": 0.5, "by_length": {"3": 0.75, "4": 0.25}}]


def test_report_embeds_plots_and_escapes_traces(tmp_path):
    traces = [{"step": 1, "prompt": "A=[1,2] i=0\n", "thought": "<script>alert(1)</script> & more", "answer": "<b>1</b>",
               "reference": "1", "reward": 1.0, "status": "ok", "finish_reason": "stop"},
              {"step": 4, "prompt": "A=[3] i=0\n", "thought": None, "answer": "3", "reference": "3", "reward": 1.0,
               "status": "ok", "finish_reason": "stop"}]
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    page = write_report(tmp_path, "demo <run>", _history(4), _evals()).read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3  # against step, against wall time, accuracy by length
    assert all(base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n" for png in images)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert "&lt;b&gt;1&lt;/b&gt;" in page and "demo &lt;run&gt;" in page
    assert "0.250 (step 0) -&gt; 0.500 (step 4)" in page
    assert 'class=thought' in page and 'class=answer' in page


def test_report_of_a_run_stopped_before_its_first_step(tmp_path):
    page = write_report(tmp_path, "early", [], _evals()[:1], note="Stopped early after step 0 of 10").read_text()
    assert "Stopped early after step 0 of 10" in page and page.count("data:image/png;base64,") == 1
    assert "No traces were sampled" in page
