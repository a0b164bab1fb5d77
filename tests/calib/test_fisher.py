"""The loss-gradient pass (mpq/calib/fisher.py) against autograd on one linear, its file contract, and the
allocator following it (a linear whose output moves the loss more gets the 4-bit tiles)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "robustness"))

from tinymodel import build_tiny_model, byte_tokenizer, tiny_config  # noqa: E402

from mpq.calib.fisher import FISHER_FILE, load_fisher, output_gradient_energy  # noqa: E402
from mpq.errors import ArtifactError  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(tiny_config(layers=2), byte_tokenizer(), seed=3).float()


def test_energy_matches_autograd_on_one_linear(tiny):
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    got = output_gradient_energy(tiny, windows, torch.device("cpu"))
    name = "model.layers.1.self_attn.v_proj"
    mod = tiny.get_submodule(name)
    total, outs = torch.zeros(mod.out_features), []
    def keep(_module, _inputs, out):
        out.retain_grad()
        outs.append(out)

    handle = mod.register_forward_hook(keep)
    for w in windows:
        outs.clear()
        emb = tiny.model.embed_tokens(w[None]).detach().requires_grad_(True)
        tiny(inputs_embeds=emb, labels=w[None], use_cache=False).loss.backward()
        total += outs[0].grad.pow(2).reshape(-1, mod.out_features).sum(0)
    handle.remove()
    want = total / windows.numel()
    assert set(got) == {n for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-12)
    assert (want > 0).all() and all(p.grad is None for p in tiny.parameters())  # weights get no gradients


def test_load_fisher_validates(tmp_path):
    from safetensors.torch import save_file

    shapes = {"model.layers.0.mlp.up_proj": 8}
    assert load_fisher(tmp_path, shapes) is None  # none there: the caller falls back
    save_file({"model.layers.0.mlp.up_proj": torch.rand(8)}, str(tmp_path / FISHER_FILE))
    assert load_fisher(tmp_path, shapes)["model.layers.0.mlp.up_proj"].shape == (8,)
    for bad in (torch.rand(7), torch.full((8,), float("nan")), -torch.rand(8)):
        save_file({"model.layers.0.mlp.up_proj": bad}, str(tmp_path / FISHER_FILE))
        with pytest.raises(ArtifactError, match="malformed entry"):
            load_fisher(tmp_path, shapes)


def test_allocation_follows_the_loss_gradients():
    """Two identical linears (same weights, same Hessian): the one with 100x the gradient energy takes the 4-bit
    tiles; with the gradients swapped, the other one does; without them the split is even."""
    from mpq.quant.allocation import allocate
    from mpq.quant.pipeline import measure_linear
    from mpq.quant.recipe import Recipe

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 512, generator=gen)  # 4 group columns of 128
    x = torch.randn(1024, 512, generator=gen)
    h = x.T @ x / 1024
    recipe = Recipe(outliers=0, gptq_aware=False)

    def fours(g_a, g_b):
        costs = [measure_linear(name, w, h, recipe, grad2=g) for name, g in (("a", g_a), ("b", g_b))]
        plan = allocate(costs, 2.9, {})  # room for about two 4-bit group columns out of eight
        return [row.n4 for row in plan.linears]

    big, small = torch.full((32,), 100.0), torch.ones(32)
    a, b = fours(big, small)
    assert a > b
    assert fours(small, big) == [b, a]
    even = fours(None, None)
    assert even[0] == even[1]


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_energy_for_every_linear_of_other_families(kind):
    """Qwen2 (q/k/v biases) and Mistral-style configs: every decoder linear gets a finite, positive energy per row."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    cls = Qwen2Config if kind == "qwen2" else MistralConfig
    config = cls(vocab_size=258, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    got = output_gradient_energy(model, torch.randint(0, 258, (2, 24)), torch.device("cpu"))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    assert set(got) == set(linears) and len(got) == 14
    for name, g in got.items():
        assert g.shape == (linears[name].out_features,) and torch.isfinite(g).all() and (g > 0).all()
