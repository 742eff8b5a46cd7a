"""Module math per option, recomputed by hand from the module's own weights (models.md §0-2).

Found by transplanting scvi-tools 1.4.2 weights into cellvi for every SCVI/SCANVI module
option: SCANVI's p(z1 | z2, y) decoder ignored the norm settings (always BatchNorm, never
LayerNorm) and added 1e-4 to its variance; everything else agreed to float precision. The
tests below check the fixed pieces, old files keeping their decoder, and a few SCVI options
that agreed (encoder, decoder, dispersion and the per-cell loss terms).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import Normal
from torch.distributions import kl_divergence as kl
from torch.nn import functional as F

from cellvi.module import SCANVAE, VAE, VAEConfig
from cellvi.nn import FCLayers

N_CELLS, N_GENES, N_BATCH, N_LABELS = 40, 30, 3, 3


def _tensors(cat: bool = True, cont: bool = True, size_factor: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(N_CELLS, N_GENES, generator=g) * 6, generator=g)
    x[:, 0] += 1  # no empty cell
    t = {
        "X": x,
        "batch": torch.randint(0, N_BATCH, (N_CELLS, 1), generator=g),
        "labels": torch.randint(0, N_LABELS, (N_CELLS, 1), generator=g),
    }
    if cat:
        t["extra_categorical_covs"] = torch.randint(0, 4, (N_CELLS, 1), generator=g)
    if cont:
        t["extra_continuous_covs"] = torch.randn(N_CELLS, 2, generator=g)
    if size_factor:
        t["size_factor"] = torch.rand(N_CELLS, 1, generator=g) + 0.5
    return t


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights and BatchNorm statistics, then eval mode (dropout off)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


def _fc_by_hand(fc: FCLayers, x, cats=(), cont=None):
    """models.md §0 FC stack in eval mode: Linear(input ⊕ cont ⊕ one-hots) → BN → LN → ReLU."""
    h = x.double()
    for i, block in enumerate(fc.blocks):
        lin = block["linear"]
        parts = [h]
        if cont is not None and lin.linear.weight.shape[1] > h.shape[1]:
            parts.append(cont.double())
        w = lin.linear.weight.double()
        out = torch.cat(parts, -1) @ w.T + lin.linear.bias.double()
        if lin.cov_weight is not None and (i == 0 or fc.inject_covariates):
            onehots = [
                F.one_hot(c.reshape(-1), n).double() for c, n in zip(cats, lin.n_cat_list) if n
            ]
            out = out + torch.cat(onehots, -1) @ lin.cov_weight.double()
        if "batch_norm" in block:
            bn = block["batch_norm"]
            out = (out - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + 1e-3)
            out = out * bn.weight.double() + bn.bias.double()
        if "layer_norm" in block:
            mu, var = out.mean(-1, keepdim=True), out.var(-1, unbiased=False, keepdim=True)
            out = (out - mu) / torch.sqrt(var + 1e-5)
        h = torch.relu(out)
    return h


def _close(got, hand):
    """float32 module output against the float64 hand computation."""
    torch.testing.assert_close(got.double(), hand.double(), rtol=1e-4, atol=1e-5)


def _linear(layer, h):
    return h @ layer.weight.double().T + layer.bias.double()


def _scanvae(**options) -> SCANVAE:
    torch.manual_seed(0)
    cfg = VAEConfig(n_hidden=12, n_latent=4, **options)
    return _randomize(SCANVAE(N_GENES, cfg, n_labels=N_LABELS, n_batch=N_BATCH))


def _norm_layers(fc: FCLayers) -> tuple[bool, bool]:
    return "batch_norm" in fc.blocks[0], "layer_norm" in fc.blocks[0]


# ------------------------------------------------------------------ SCANVI: fixed pieces
@pytest.mark.parametrize(
    ("use_batch_norm", "use_layer_norm", "expected"),
    [
        ("both", "none", (True, False)),
        ("none", "none", (False, False)),
        ("encoder", "both", (False, True)),
        ("decoder", "decoder", (True, True)),
        ("none", "encoder", (False, False)),
    ],
)
def test_z1_z2_decoder_follows_the_decoder_norm_settings(use_batch_norm, use_layer_norm, expected):
    mod = _scanvae(use_batch_norm=use_batch_norm, use_layer_norm=use_layer_norm, n_layers=2)
    assert _norm_layers(mod.decoder_z1_z2) == expected
    g = torch.Generator().manual_seed(3)
    z2 = torch.randn(N_CELLS, 4, generator=g)
    ys = torch.randint(0, N_LABELS, (N_CELLS, 1), generator=g)
    with torch.no_grad():
        got = mod.decoder_z1_z2(z2, ys)
    _close(got, _fc_by_hand(mod.decoder_z1_z2, z2, [ys]))


def test_scanvi_loss_uses_exp_of_the_z1_variance_head_without_epsilon():
    """log p(z1 | z2, y) with σ² = exp(Linear(h)) (scvi-tools), also where σ² is tiny."""
    mod = _scanvae(use_observed_lib_size=True)
    with torch.no_grad():
        mod.pz1_var.bias.fill_(-9.0)  # σ² ≈ 1e-4: an added 1e-4 would halve log-densities
        mod.pz1_var.weight.mul_(0.01)
    t = _tensors(cat=False, cont=False)
    with torch.no_grad():
        inf = mod.inference(t)
        gen = mod.generative(inf["z"], inf["library"], t)
        torch.manual_seed(7)
        out = mod.loss(t, inf, gen)
        z1, n, k = inf["z"], N_CELLS, N_LABELS
        ys = torch.arange(k).repeat_interleave(n).reshape(-1, 1)
        torch.manual_seed(7)
        _, _, z2 = mod.encoder_z2_z1(z1.repeat(k, 1), ys)
        h = mod.decoder_z1_z2(z2, ys)
        p1 = Normal(mod.pz1_mean(h), mod.pz1_var(h).exp().sqrt())
        log_pz1 = p1.log_prob(z1.repeat(k, 1)).sum(-1).view(k, n).t()
        probs = torch.softmax(mod.classifier(z1), -1)
        rec = (
            -mod.log_likelihood(t["X"], gen)
            + Normal(inf["qz_m"], inf["qz_v"].sqrt()).log_prob(z1).sum(-1)
            - (probs * log_pz1).sum(-1)
        )
    torch.testing.assert_close(out.reconstruction_loss, rec, rtol=1e-5, atol=1e-3)


def _legacy_state(mod: SCANVAE) -> dict:
    """What a file saved before the fix holds: a BatchNorm-only z1|z2 decoder, no marker."""
    legacy = FCLayers(4, 12, n_cat_list=[N_LABELS], n_layers=1, n_hidden=12, dropout_rate=0.0)
    _randomize(legacy)
    state = {k: v for k, v in mod.state_dict().items() if not k.startswith("decoder_z1_z2.")}
    state.pop("z1_z2_decoder_follows_norms")
    state.update({f"decoder_z1_z2.{k}": v for k, v in legacy.state_dict().items()})
    return state, legacy


@pytest.mark.parametrize(
    ("use_batch_norm", "use_layer_norm"), [("none", "none"), ("both", "decoder"), ("both", "none")]
)
def test_files_saved_before_the_fix_load_with_their_old_z1_z2_decoder(
    use_batch_norm, use_layer_norm
):
    mod = _scanvae(use_batch_norm=use_batch_norm, use_layer_norm=use_layer_norm)
    state, legacy = _legacy_state(mod)
    fresh = _scanvae(use_batch_norm=use_batch_norm, use_layer_norm=use_layer_norm)
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    assert _norm_layers(fresh.decoder_z1_z2) == (True, False)
    z2 = torch.randn(N_CELLS, 4)
    ys = torch.randint(0, N_LABELS, (N_CELLS, 1))
    with torch.no_grad():
        torch.testing.assert_close(fresh.decoder_z1_z2(z2, ys), legacy(z2, ys))
    # saved again, the file says it holds the old layout, and loads the same way
    again = fresh.state_dict()
    assert not bool(again["z1_z2_decoder_follows_norms"])
    other = _scanvae(use_batch_norm=use_batch_norm, use_layer_norm=use_layer_norm)
    other.load_state_dict(again, strict=True)
    assert _norm_layers(other.decoder_z1_z2) == (True, False)
    # a new-layout file loaded into that module switches back
    other.load_state_dict(mod.state_dict(), strict=True)
    assert _norm_layers(other.decoder_z1_z2) == _norm_layers(mod.decoder_z1_z2)


def test_partial_load_without_z1_z2_weights_keeps_the_new_decoder():
    """from_scvi_model copies SCVI weights non-strictly: no z1|z2 keys, no layout change."""
    mod = _scanvae(use_batch_norm="none", use_layer_norm="both")
    scvi_like = {k: v for k, v in mod.state_dict().items() if k.startswith(("z_encoder", "px_r"))}
    mod.load_state_dict(scvi_like, strict=False)
    assert _norm_layers(mod.decoder_z1_z2) == (False, True)
    assert bool(mod.z1_z2_decoder_follows_norms)


# ------------------------------------------------------------- SCVI: options that agreed
def _vae(n_cont=2, n_cats=(4,), size_factor=False, **options) -> VAE:
    torch.manual_seed(0)
    lib = {}
    if options.get("use_observed_lib_size") is False:
        lib = {
            "library_log_means": torch.tensor([[1.0, 2.0, 3.0]]),
            "library_log_vars": torch.tensor([[0.5, 1.0, 2.0]]),
        }
    cfg = VAEConfig(n_hidden=12, n_latent=4, **options)
    module = VAE(
        N_GENES,
        cfg,
        n_batch=N_BATCH,
        n_labels=N_LABELS,
        n_continuous_cov=n_cont,
        n_cats_per_cov=list(n_cats),
        use_size_factor_key=size_factor,
        **lib,
    )
    return _randomize(module)


ENCODER_CASES = [
    {},
    {"encode_covariates": True, "n_layers": 2, "deeply_inject_covariates": False},
    {"encode_covariates": True, "batch_representation": "embedding"},
    {"use_batch_norm": "none", "use_layer_norm": "both", "var_activation": "softplus"},
    {"use_observed_lib_size": False, "encode_covariates": True},
]


@pytest.mark.parametrize("options", ENCODER_CASES)
def test_encoder_posteriors_by_hand(options):
    mod = _vae(**options)
    t = _tensors()
    with torch.no_grad():
        inf = mod.inference(t)
    x = torch.log1p(t["X"]).double()
    cats, cont = [], None
    if mod.config.encode_covariates:
        cont = t["extra_continuous_covs"]
        cats = [t["extra_categorical_covs"]]
        if mod.use_batch_embedding:
            x = torch.cat([x, mod.batch_embedding.weight[t["batch"].reshape(-1)].double()], -1)
        else:
            cats = [t["batch"], *cats]
    act = F.softplus if options.get("var_activation") == "softplus" else torch.exp
    for enc, m_key, v_key in ((mod.z_encoder, "qz_m", "qz_v"), (mod.l_encoder, "ql_m", "ql_v")):
        if enc is None:
            continue
        h = _fc_by_hand(enc.encoder, x, cats, cont)
        _close(inf[m_key], _linear(enc.mean_encoder, h))
        var = act(_linear(enc.var_encoder, h)) + 1e-4
        _close(inf[v_key], var)


@pytest.mark.parametrize(
    ("options", "size_factor"),
    [
        ({"dispersion": "gene-batch"}, False),
        ({"dispersion": "gene-label", "gene_likelihood": "nb"}, True),
        ({"dispersion": "gene-cell", "n_layers": 2, "use_batch_norm": "decoder"}, False),
        ({"batch_representation": "embedding", "use_layer_norm": "decoder"}, False),
    ],
)
def test_decoder_outputs_by_hand(options, size_factor):
    mod = _vae(size_factor=size_factor, **options)
    t = _tensors(size_factor=size_factor)
    z = torch.randn(N_CELLS, 4, generator=torch.Generator().manual_seed(4))
    lib = torch.log(t["size_factor"]) if size_factor else torch.log(t["X"].sum(1, keepdim=True))
    with torch.no_grad():
        px = mod.generative(z, lib, t)
    zin, cats = z.double(), [t["batch"], t["extra_categorical_covs"]]
    if mod.use_batch_embedding:
        zin = torch.cat([zin, mod.batch_embedding.weight[t["batch"].reshape(-1)].double()], -1)
        cats = cats[1:]
    h = _fc_by_hand(mod.decoder.px_decoder, zin, cats, t["extra_continuous_covs"])
    logits = _linear(mod.decoder.px_scale_decoder, h)
    rho = F.softplus(logits) if size_factor else torch.softmax(logits, -1)
    _close(px["scale"], rho)
    _close(mod.rate(px), lib.double().exp() * rho)
    disp = mod.config.dispersion
    if disp == "gene-cell":
        theta = _linear(mod.decoder.px_r_decoder, h).exp()
    elif disp == "gene":
        theta = mod.px_r.double().exp().expand(N_CELLS, N_GENES)
    else:
        index = t["batch"] if disp == "gene-batch" else t["labels"]
        theta = mod.px_r.double().T[index.reshape(-1)].exp()
    _close(px["theta"].expand(N_CELLS, N_GENES), theta)
    if mod.config.gene_likelihood == "zinb":
        _close(px["dropout_logits"], _linear(mod.decoder.px_dropout_decoder, h))


def test_per_cell_loss_terms_by_hand_nb_with_learned_library():
    """reconstruction = −Σ_g log NB (scipy), kl_local = KL(q(z)‖N(0,I)) + KL(q(l)‖N(m_s, v_s))."""
    mod = _vae(
        use_observed_lib_size=False, gene_likelihood="nb", dispersion="gene-batch", n_layers=2
    )
    t = _tensors()
    with torch.no_grad():
        inf = mod.inference(t)
        z, lib = torch.softmax(torch.randn(N_CELLS, 4), -1), inf["ql_m"]
        gen = mod.generative(z, lib, t)
        out = mod.loss(t, {**inf, "z": z, "library": lib}, gen)
    mu = mod.rate(gen).double().numpy()
    theta = gen["theta"].double().numpy()
    nll = -stats.nbinom.logpmf(t["X"].numpy(), theta, theta / (theta + mu)).sum(1)
    np.testing.assert_allclose(out.reconstruction_loss.numpy(), nll, rtol=1e-4)
    b = t["batch"].reshape(-1)
    prior_l = Normal(mod.library_log_means[0, b, None], mod.library_log_vars[0, b, None].sqrt())
    kl_l = kl(Normal(inf["ql_m"], inf["ql_v"].sqrt()), prior_l).sum(-1)
    kl_z = kl(Normal(inf["qz_m"], inf["qz_v"].sqrt()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(out.kl_local, kl_z + kl_l, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(out.loss))


# --------------------------------------------------------------- model files, end to end
def test_scanvi_model_file_from_before_the_fix_loads_and_predicts_the_same(tmp_path):
    """A saved SCANVI whose file is rewritten to the old z1|z2 layout still loads, and a new
    file keeps the decoder that follows use_batch_norm='none'."""
    import cellvi
    from cellvi.model import SCANVI

    adata = cellvi.data.synthetic_iid(batch_size=40, n_genes=30, n_batches=2, n_labels=3)
    adata.obs["labels"] = adata.obs["labels"].astype(str)
    adata.obs.loc[adata.obs_names[::3], "labels"] = "Unknown"
    SCANVI.setup_anndata(adata, "labels", "Unknown", batch_key="batch")
    with cellvi.settings.override(progress_bar_style="none", logging_dir=str(tmp_path)):
        model = SCANVI(adata, n_hidden=12, n_latent=4, use_batch_norm="none")
        model.train(max_epochs=1, batch_size=40)
        model.save(tmp_path / "new")
        loaded = SCANVI.load(tmp_path / "new", adata=adata.copy())
    assert _norm_layers(loaded.module.decoder_z1_z2) == (False, False)
    np.testing.assert_array_equal(loaded.predict(soft=True), model.predict(soft=True))

    path = tmp_path / "new" / "model.pt"
    content = torch.load(path, weights_only=True)
    state = content["model_state_dict"]
    legacy = _randomize(FCLayers(4, 12, n_cat_list=[3], n_layers=1, n_hidden=12, dropout_rate=0.0))
    for key in [k for k in state if k.startswith("decoder_z1_z2.")]:
        del state[key]
    del state["z1_z2_decoder_follows_norms"]
    state.update({f"decoder_z1_z2.{k}": v for k, v in legacy.state_dict().items()})
    torch.save(content, path)
    old = SCANVI.load(tmp_path / "new", adata=adata.copy())
    assert _norm_layers(old.module.decoder_z1_z2) == (True, False)
    z2, ys = torch.randn(8, 4), torch.randint(0, 3, (8, 1))
    with torch.no_grad():
        torch.testing.assert_close(old.module.decoder_z1_z2.eval()(z2, ys), legacy(z2, ys))
    # reference mapping from the old file keeps the old decoder and its weights
    query = adata.copy()
    query.obs["batch"] = "query_batch"
    mapped = SCANVI.load_query_data(query, tmp_path / "new")
    assert _norm_layers(mapped.module.decoder_z1_z2) == (True, False)
    assert not bool(mapped.module.z1_z2_decoder_follows_norms)
    with torch.no_grad():
        torch.testing.assert_close(mapped.module.decoder_z1_z2.eval()(z2, ys), legacy(z2, ys))
