"""report.html is one self-contained page with the plots embedded and the build's facts in it."""

from __future__ import annotations

import base64
import re

from edgeprune import build
from edgeprune.pipeline import BuildOptions
from edgeprune.target import Budget

MODEL = """
import torch
from torch import nn

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
"""


def test_report_html_embeds_its_plots_and_states_the_verdict(tmp_path):
    (tmp_path / "net.py").write_text(MODEL)
    options = BuildOptions(model=f"{tmp_path / 'net.py'}:net", input_shape=(1, 3, 32, 32),
                           budget=Budget(latency_ms=1000.0), out=tmp_path / "out")  # fmt: skip
    report = build(options, say=lambda message: None)
    page = (tmp_path / "out" / "report.html").read_text()
    assert report["artifacts"]["html"] == "report.html"
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3  # rounds, quality against latency, widths
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert "Budget met." in page and "x86-openvino" in page
    assert "src='http" not in page and "href='http" not in page  # nothing to fetch: it opens offline
    for name in ("model.xml", "model.bin", "plan.json", "report.json"):
        assert name in page  # the manifest table
