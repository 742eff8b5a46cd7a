"""README.md as a new user meets it: the first two commands and the python examples.

The examples run as written except for the sizes, which explicit substitutions shrink; a
substitution that no longer matches fails the test, so the README and this file stay in step.
Examples needing files that cannot exist here (atlases, a TileDB-SOMA experiment), a C++
compiler (``torch.compile``) or a GPU are not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import cellvi

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.S | re.M)


def _example(marker: str, substitutions: list[tuple[str, str]]) -> str:
    """The python block containing ``marker``, with each ``old`` replaced by ``new``."""
    (code,) = [b for b in _blocks("python") if marker in b]
    for old, new in substitutions:
        assert old in code, f"README example changed: {old!r} not found; update this test"
        code = code.replace(old, new)
    return code


def _run(code: str, namespace: dict) -> dict:
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_readme_opens_with_quickstart_then_the_ci_test_command():
    text = README.read_text()
    head = text[: text.index("The first command")]
    fences = re.findall(r"^```(\w*)\n(.*?)^```", head, re.S | re.M)
    assert [lang for lang, _ in fences] == ["bash", "bash"]
    quickstart, tests = (body.strip() for _, body in fences)
    assert head.startswith("# cellvi\n")
    assert quickstart.startswith("pip install torch==") and "cellvi quickstart --out" in quickstart
    ci_lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip()]
    assert tests.startswith("pip install torch==")
    assert tests.endswith("&& " + ci_lines[-1]), (tests, ci_lines[-1])
    # the two installs pin the torch that CI installs, with the extras CI installs
    ci_text = "\n".join(ci_lines)
    torch_pin = quickstart.split()[2]
    assert f'"{torch_pin}"' in ci_text
    assert 'pip install -q -e ".[test,plot,tiledbsoma,scanpy]"' in ci_text
    assert 'pip install -e ".[test,plot,tiledbsoma,scanpy]"' in tests


def test_first_example_trains_saves_and_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _example(
        'model.save("my_model")',
        [
            ("n_cells=2000", "n_cells=200"),
            ("n_genes=500", "n_genes=60"),
            ("max_epochs=100", "max_epochs=2"),
        ],
    )
    ns = _run(code, {})
    assert ns["adata"].obsm["X_scVI"].shape == (200, 10)
    assert (tmp_path / "my_model" / "model.pt").is_file()
    assert isinstance(ns["model"], cellvi.model.SCVI)
    np.testing.assert_array_equal(
        ns["model"].get_latent_representation(), ns["adata"].obsm["X_scVI"]
    )


def test_label_transfer_and_reference_mapping_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = cellvi.data.simulate(n_cells=240, n_genes=60, n_batches=2, n_cell_types=3, seed=0)
    first = data.obs["batch"] == data.obs["batch"].cat.categories[0]
    adata, query = data[first].copy(), data[~first].copy()
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[::3] = "Unknown"
    adata.obs["labels"] = labels
    query.obs["batch"] = "query_batch"
    query.obs["labels"] = "Unknown"
    cellvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model = cellvi.model.SCVI(adata)
    model.train(max_epochs=1)
    model.save("ref_dir")
    code = _example(
        "from_scvi_model",
        [("max_epochs=200,", "max_epochs=1,"), ("max_epochs=20)", "max_epochs=1)")],
    )
    ns = _run(code, {"cellvi": cellvi, "model": model, "adata": adata, "query": query})
    predicted = ns["adata"].obs["predicted"]
    assert set(predicted) <= {"type_0", "type_1", "type_2"}
    q = ns["q"]
    assert q.get_latent_representation().shape == (query.n_obs, 10)
    assert "query_batch" in list(q.adata_manager.get_state_registry("batch")["categorical_mapping"])


def test_history_metrics_are_those_the_readme_names(tmp_path):
    """README "Training": validation twins only when validation runs (no ``kl_weight`` twin,
    ``validation_loss`` for ``train_loss``); ``log_save_dir`` pickles to ``version_1`` first."""
    adata = cellvi.data.simulate(n_cells=120, n_genes=50, n_batches=2, n_cell_types=2, seed=0)
    cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    train_keys = ["elbo", "reconstruction_loss", "kl_local", "kl_global"]
    model = cellvi.model.SCVI(adata)
    model.train(max_epochs=1, log_save_dir=str(tmp_path / "logs"))
    assert sorted(model.history) == sorted(
        [f"{k}_train" for k in train_keys] + ["train_loss", "kl_weight"]
    )
    assert (tmp_path / "logs" / "lightning_logs" / "version_1" / "history.pkl").is_file()
    model = cellvi.model.SCVI(adata)
    model.train(max_epochs=1, check_val_every_n_epoch=1)
    expected = [f"{k}_{s}" for k in train_keys for s in ("train", "validation")]
    assert sorted(model.history) == sorted(
        expected + ["train_loss", "validation_loss", "kl_weight"]
    )
