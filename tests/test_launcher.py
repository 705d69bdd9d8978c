"""launcher.py in process: the command it starts and how it reads a clean stop. (It starts real
ranks in tests/test_train.py and tests/test_signals.py.)"""

from __future__ import annotations

import json
import sys
import time

from mtgpt import launcher, rundir


def test_command_runs_the_worker_under_deepspeeds_node_launcher():
    import base64

    cmd = launcher.command("/tmp/cfg.json", 2, 29555)
    assert cmd[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
    info = next(a for a in cmd if a.startswith("--world_info=")).split("=", 1)[1]
    assert json.loads(base64.urlsafe_b64decode(info)) == {"localhost": [0, 1]}
    assert "--master_port=29555" in cmd
    assert cmd[-5:] == ["--module", "mtgpt", "worker", "--config", "/tmp/cfg.json"]
    # a --ds-config given on the command line reaches the ranks as given (a resume then reads it as it is now)
    assert launcher.command("/tmp/cfg.json", 2, 29555, "/my.json")[-2:] == ["--ds-config", "/my.json"]


def test_default_nproc():
    import torch

    assert launcher.default_nproc() == (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    if not torch.cuda.is_available():  # a resumed run's own number of ranks, on CPU any
        assert launcher.default_nproc(resumed=1) == 1 and launcher.default_nproc(resumed=3) == 3


def test_clean_stop_since(tmp_path):
    started = time.time()
    assert not launcher.clean_stop_since(str(tmp_path), started)  # no last_stop.json
    (tmp_path / rundir.LAST_STOP).write_text(json.dumps({"reason": "signal", "time": started - 60}))
    assert not launcher.clean_stop_since(str(tmp_path), started)  # an older run's stop
    rundir.write_last_stop(tmp_path, reason="signal", step=4)
    assert launcher.clean_stop_since(str(tmp_path), started)
    (tmp_path / rundir.LAST_STOP).write_text("{torn")
    assert not launcher.clean_stop_since(str(tmp_path), started)
