"""DDP defects found by probing: launcher clean-up and error reporting, worker errors keep
their class, optimiser state after forked workers, too few cells per rank."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

import cellvi
from cellvi.errors import NonFiniteLossError
from cellvi.model import SCVI, _launch

pytestmark = pytest.mark.ddp

TWO_CPU_RANKS = {"accelerator": "cpu", "devices": 2, "strategy": "ddp_notebook"}


def _data(n=200, batch_key="batch"):
    adata = cellvi.data.simulate(
        n_cells=n, n_genes=40, n_cell_types=min(n, 3), n_de_genes_per_type=5, seed=0
    )
    SCVI.setup_anndata(adata, batch_key=batch_key)
    return adata


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_launcher_stops_its_ranks_and_names_the_rank_that_failed_first(tmp_path, monkeypatch):
    # a stand-in for torchrun: it starts a "rank" in a session of its own (as torchrun does)
    # and ignores SIGTERM; before the fix a timeout killed it alone and the rank trained on
    stuck = tmp_path / "stuck.py"
    stuck.write_text(
        textwrap.dedent("""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                                 sys.argv[1]], start_new_session=True)
        open(sys.argv[1] + "/rank.pid", "w").write(str(rank.pid))
        time.sleep(120)
    """)
    )
    monkeypatch.setattr(_launch, "_command", lambda folder, n: [sys.executable, stuck, folder])
    monkeypatch.setattr(_launch._stop, "__defaults__", (1.0,))  # a short SIGTERM grace
    with pytest.raises(RuntimeError, match="did not finish within timeout=3"):
        _launch._run(tmp_path, 2, timeout=3)
    pid = int((tmp_path / "rank.pid").read_text())
    deadline = time.time() + 5
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)

    # rank 1 failed first; rank 0 then only lost its peer in a collective
    failing = tmp_path / "failing.py"
    failing.write_text(
        textwrap.dedent("""
        import sys, time
        open(sys.argv[1] + "/error_rank1.txt", "w").write("ValueError: the real cause")
        time.sleep(0.05)
        open(sys.argv[1] + "/error_rank0.txt", "w").write(
            "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
        sys.exit(1)
    """)
    )
    monkeypatch.setattr(_launch, "_command", lambda folder, n: [sys.executable, failing, folder])
    with pytest.raises(RuntimeError, match=r"unchanged\. rank1: ValueError: the real cause$"):
        _launch._run(tmp_path, 2, timeout=60)


@pytest.mark.filterwarnings("ignore:The KL warm-up lasts")
def test_forked_workers_leave_optimizer_state_and_nan_keeps_its_class(tmp_path):
    model = SCVI(_data(), n_hidden=16, n_latent=3)
    warmup = {"n_epochs_kl_warmup": 4}
    with cellvi.settings.override(logging_dir=tmp_path):
        model.train(max_epochs=2, **TWO_CPU_RANKS, plan_kwargs=warmup)
        # the launching process ran no step: rank 0's optimiser state comes from last.ckpt
        assert model._training_progress == (2, 2)
        model.train(max_epochs=1, accelerator="cpu", devices=1, resume=True, plan_kwargs=warmup)
        kl = model.history["kl_weight"]["kl_weight"].tolist()
        assert kl == pytest.approx([0.0, 0.25, 0.5])

        # the NaN guardrail's error in a worker reaches the caller as NonFiniteLossError
        fresh = SCVI(_data(), n_hidden=16, n_latent=3)
        with pytest.raises(NonFiniteLossError, match="training loss became NaN/inf") as info:
            fresh.train(max_epochs=3, **TWO_CPU_RANKS, plan_kwargs={"lr": 1e6})
    assert type(info.value.__cause__).__name__ == "ProcessRaisedException"
    assert any("resume" in note for note in info.value.__notes__)
    assert not fresh.is_trained


def test_too_few_training_cells_per_rank_is_refused_before_processes_start():
    model = SCVI(_data(n=2, batch_key=None), n_hidden=8, n_latent=2)
    started = time.time()
    with pytest.raises(ValueError, match=r"2 training cell\(s\) on 2 processes leave 1 cell"):
        model.train(max_epochs=1, **TWO_CPU_RANKS)
    assert time.time() - started < 10 and not model.is_trained
