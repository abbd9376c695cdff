"""Weight paging on the CPU: parity with plain training, then structure and bad input.

On the CPU "device" and "host" are both CPU memory, but the same paging logic
runs: parameters live in separate host pool blocks between uses, device shells
are resized and refilled, gradients are copied out by the grad hooks and
accumulated on the host, and the optimizer steps the host masters.
"""

import contextlib
import copy
import dataclasses
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lms
from examples.gpt import GPT, GPTConfig, synthetic_batch
from lms.config import LMSConfig
from lms.errors import LMSError
from lms.runtime import Runtime
from lms.weights import attach_weight_paging
from lms.weights_param import Phase

# The advice to use fused=True is tested once below; the parity tests use every variant.
pytestmark = pytest.mark.filterwarnings("ignore:.*without fused=True")

CFG = GPTConfig(vocab_size=256, seq_len=32, n_layer=2, n_head=4, n_embd=64)
CPU = torch.device("cpu")
# The smallest limit a CFG model runs under is 130 KiB: the largest paged module,
# mlp.fc, with its gradient (NOTE [Weight paging plan] Rule 5).
LIMIT = "160KiB"


def runtime(limit=LIMIT, min_size="4KiB", weights=True, **kw):
    return Runtime(CPU, LMSConfig(limit=limit, min_size=min_size, weights=weights, **kw))


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def batches(n, batch=4, seed=1, cfg=CFG):
    g = torch.Generator().manual_seed(seed)
    return [synthetic_batch(cfg, batch, g) for _ in range(n)]


def train(model, opt, data, accum=1):
    losses = []
    for i in range(0, len(data), accum):
        for x, y in data[i : i + accum]:
            loss = model(x, y)
            (loss / accum).backward()
            losses.append(loss.detach().clone())
        opt.step()
        opt.zero_grad()
    return losses


def assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def pair(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    base = GPT(cfg)
    return base, copy.deepcopy(base)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    ],
    ids=["adamw", "adamw_fused", "sgd_momentum"],
)
def test_parity_bitwise_model_several_times_the_limit(make_opt):
    base, paged = pair(cfg=dataclasses.replace(CFG, n_layer=6))
    rt = runtime()
    handle = attach_weight_paging(paged, rt)
    assert param_bytes(paged) > 7 * rt.limit  # 1.27 MB of parameters, 160 KiB limit
    assert "blocks.0.mlp.fc.weight" in handle.paged_names
    data = batches(4)
    lb = train(base, make_opt(base.parameters()), data)
    lp = train(paged, make_opt(paged.parameters()), data)
    assert all(torch.equal(a, b) for a, b in zip(lb, lp)), (lb, lp)
    assert_same_params(base, paged)
    s = rt.stats
    # Every paged parameter came in at least twice per step (forward and backward).
    paged_bytes = handle.plan.paged_bytes
    assert s.swapped_in_bytes >= 2 * 4 * paged_bytes
    trainable = sum(pp.nbytes for pp in handle.paged if pp.param.requires_grad)
    assert s.swapped_out_bytes == 4 * trainable  # one gradient copy per param per backward
    assert s.resident_bytes == 0  # everything released between steps
    assert handle.phase is Phase.HOST
    handle.remove()


def test_gradient_clipping_between_backward_and_step_matches():
    # clip_grad_norm_ reads every .grad between backward and step: the host accumulators
    # of paged parameters and the device gradients of resident ones (on a GPU it sums
    # the norms of the two devices; here both are the CPU, so the sums are the same).
    base, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    assert handle.paged_names and len(handle.paged_names) < len(list(paged.parameters()))
    norms = {}
    for model in (base, paged):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        norms[model] = []
        for x, y in batches(4):
            model(x, y).backward()
            norms[model].append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1))
            opt.step()
            opt.zero_grad()
    assert all(n > 0.1 for n in norms[base])  # clipping was active
    assert all(torch.equal(a, b) for a, b in zip(norms[base], norms[paged]))
    assert_same_params(base, paged)
    handle.remove()


def test_unfused_host_optimizer_warns_once():
    _, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    opt = torch.optim.AdamW(paged.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="fused=True"):
        train(paged, opt, batches(1))
    handle.remove()


def test_tied_weights_stay_tied_and_match():
    base, paged = pair()
    assert paged.head.weight is paged.wte.weight
    handle = attach_weight_paging(paged, runtime())
    assert handle.paged_names.count("wte.weight") == 1
    assert "head.weight" not in handle.paged_names  # tied: one parameter, one master
    data = batches(2)
    train(base, torch.optim.SGD(base.parameters(), lr=0.1), data)
    train(paged, torch.optim.SGD(paged.parameters(), lr=0.1), data)
    assert paged.head.weight is paged.wte.weight
    assert torch.equal(base.wte.weight, paged.wte.weight)
    handle.remove()
    assert paged.head.weight is paged.wte.weight


def test_gradient_accumulation_matches():
    base, paged = pair()
    rt = runtime()
    handle = attach_weight_paging(paged, rt)
    data = batches(6)
    lb = train(base, torch.optim.AdamW(base.parameters(), lr=1e-2), data, accum=3)
    lp = train(paged, torch.optim.AdamW(paged.parameters(), lr=1e-2), data, accum=3)
    assert all(torch.equal(a, b) for a, b in zip(lb, lp))
    assert_same_params(base, paged)
    # The accumulation temporaries are pool blocks reused after the first step.
    allocs = rt.stats.pinned_allocs
    train(paged, torch.optim.SGD(paged.parameters(), lr=0.0), batches(3), accum=3)
    assert rt.stats.pinned_allocs == allocs
    handle.remove()


def test_grads_visible_on_host_between_backward_and_step():
    base, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    ((x, y),) = batches(1)
    base(x, y).backward()
    paged(x, y).backward()
    pp = handle.paged[0]
    assert pp.param.grad is pp.acc  # the host accumulator
    for (n, a), b in zip(base.named_parameters(), paged.parameters()):
        assert torch.equal(a.grad, b.grad), n
    handle.remove()
    for a, b in zip(base.parameters(), paged.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_state_dict_real_values_in_every_phase_and_load():
    base, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    ((x, y),) = batches(1)
    loss = paged(x, y)  # forward done, backward pending: parameters point at empty shells
    assert handle.phase is Phase.DEVICE
    assert paged.blocks[0].mlp.fc.weight.untyped_storage().nbytes() == 0
    sd = paged.state_dict()
    assert_same_params(base, paged)
    for k, v in base.state_dict().items():
        assert torch.equal(sd[k], v), k
    loss.backward()
    # Loading a state dict writes the masters that the next forward reads.
    torch.manual_seed(123)
    other = GPT(CFG)
    paged.load_state_dict(other.state_dict())
    assert_same_params(other, paged)
    with torch.no_grad():
        assert torch.equal(other(x, y), paged(x, y))
    handle.remove()


def test_checkpoint_save_and_resume_gives_same_losses():
    data = batches(6)
    base, paged = pair()
    ref = train(base, torch.optim.AdamW(base.parameters(), lr=1e-2), data)

    handle = attach_weight_paging(paged, runtime())
    opt = torch.optim.AdamW(paged.parameters(), lr=1e-2)
    first = train(paged, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": paged.state_dict(), "opt": opt.state_dict()}, buf)
    handle.remove()

    torch.manual_seed(99)  # a different init, overwritten by the checkpoint
    resumed = GPT(CFG)
    handle2 = attach_weight_paging(resumed, runtime())
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    rest = train(resumed, opt2, data[3:])
    assert all(torch.equal(a, b) for a, b in zip(ref, first + rest))
    assert_same_params(base, resumed)
    handle2.remove()


class Branchy(nn.Module):
    """Takes one of two paths depending on the data, so the module order changes."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x, y):
        h = torch.tanh(self.inp(x))
        h = self.a(h) if x.sum() > 0 else self.b(self.b(h))  # b is a shared module: twice
        return F.cross_entropy(self.out(h), y)


def test_order_change_is_handled_not_silently_wrong():
    torch.manual_seed(0)
    base = Branchy()
    paged = copy.deepcopy(base)
    handle = attach_weight_paging(paged, runtime(limit=0, min_size="1KiB"))
    g = torch.Generator().manual_seed(3)
    data = []
    for sign in (1, 1, -1, 1, -1, -1):
        x = torch.randn(8, 32, generator=g).abs() * sign
        data.append((x, torch.randint(4, (8,), generator=g)))
    lb = train(base, torch.optim.AdamW(base.parameters(), lr=1e-2), data)
    lp = train(paged, torch.optim.AdamW(paged.parameters(), lr=1e-2), data)
    assert all(torch.equal(a, b) for a, b in zip(lb, lp))
    assert_same_params(base, paged)
    ids = handle._module_ids
    order_b = [ids[id(m)] for m in (paged.inp, paged.b, paged.b, paged.out)]
    assert handle.tracker.learned == order_b  # re-learned from the last step
    handle.remove()


class Checkpointed(nn.Module):
    """Recomputes each block's forward inside backward (torch.utils.checkpoint)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(64, 64) for _ in range(3))
        self.out = nn.Linear(64, 4)

    def forward(self, x, y):
        for blk in self.blocks:
            x = checkpoint(lambda t, blk=blk: torch.tanh(blk(t)), x, use_reentrant=False)
        return F.cross_entropy(self.out(x), y)


def test_activation_checkpointing_inside_the_model():
    torch.manual_seed(0)
    base = Checkpointed()
    paged = copy.deepcopy(base)
    handle = attach_weight_paging(paged, runtime(limit=0, min_size="1KiB"))
    g = torch.Generator().manual_seed(5)
    data = [
        (torch.randn(8, 64, generator=g), torch.randint(4, (8,), generator=g)) for _ in range(3)
    ]
    lb = train(base, torch.optim.SGD(base.parameters(), lr=0.1, momentum=0.9), data)
    lp = train(paged, torch.optim.SGD(paged.parameters(), lr=0.1, momentum=0.9), data)
    assert all(torch.equal(a, b) for a, b in zip(lb, lp))
    assert_same_params(base, paged)
    handle.remove()


def test_frozen_params_and_eval_forward_between_steps():
    base, paged = pair()
    for m in (base, paged):
        m.wpe.weight.requires_grad_(False)
    handle = attach_weight_paging(paged, runtime())
    data = batches(3)
    ob = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=1e-2)
    op = torch.optim.AdamW([p for p in paged.parameters() if p.requires_grad], lr=1e-2)
    for x, y in data:
        for model, opt in ((base, ob), (paged, op)):
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
            model.eval()
            with torch.no_grad():
                model(x, y)
            model.train()
        assert handle.phase is Phase.HOST  # the no_grad forward went back to the host
    assert_same_params(base, paged)
    handle.remove()


def test_optimizer_created_before_enable_keeps_working():
    base, paged = pair()
    ob = torch.optim.AdamW(base.parameters(), lr=1e-2)
    op = torch.optim.AdamW(paged.parameters(), lr=1e-2)
    data = batches(4)
    lb = train(base, ob, data[:2])
    lp = train(paged, op, data[:2])  # state exists before enable
    handle = attach_weight_paging(paged, runtime())
    lb += train(base, ob, data[2:])
    lp += train(paged, op, data[2:])
    assert all(torch.equal(a, b) for a, b in zip(lb, lp))
    assert_same_params(base, paged)
    handle.remove()
    # After remove the same optimizer keeps working on the restored parameters.
    lb = train(base, ob, data[:1])
    lp = train(paged, op, data[:1])
    assert torch.equal(lb[0], lp[0])


def test_remove_restores_and_is_idempotent():
    _, paged = pair()
    before = {k: v.clone() for k, v in paged.state_dict().items()}
    handle = attach_weight_paging(paged, runtime())
    masters = {pp.name: pp.master.data_ptr() for pp in handle.paged}
    with handle:
        ((x, y),) = batches(1)
        paged(x, y)  # leave a graph pending: remove must still restore cleanly
    handle.remove()
    for name, p in paged.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
        assert p.data_ptr() != masters.get(name, -1)
    for k, v in paged.state_dict().items():
        assert torch.equal(v, before[k])
    assert not paged._forward_hooks and not paged._forward_pre_hooks
    assert all(not m._forward_hooks for m in paged.modules())


def test_deferred_grad_offload_waits_for_the_reducer():
    base, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    grads_ready = handle.defer_grad_offload()
    paged_params = [pp.param for pp in handle.paged if pp.param.requires_grad]

    # A stand-in for a gradient reducer (ddl.wrap): it "reduces" by halving each
    # .grad on the device from its own post-accumulate hook, then says it is ready.
    seen_on_device = []

    def reduce(p):
        seen_on_device.append(handle.phase is Phase.DEVICE and p.grad is not None)
        p.grad.mul_(0.5)
        grads_ready([p])

    hooks = [p.register_post_accumulate_grad_hook(reduce) for p in paged.parameters()]

    def halve(p):
        p.grad.mul_(0.5)

    for p in base.parameters():
        p.register_post_accumulate_grad_hook(halve)
    data = batches(3)
    lb = train(base, torch.optim.AdamW(base.parameters(), lr=1e-2), data)
    lp = train(paged, torch.optim.AdamW(paged.parameters(), lr=1e-2), data)
    assert all(seen_on_device)
    assert all(torch.equal(a, b) for a, b in zip(lb, lp))
    assert_same_params(base, paged)

    # A reducer that forgets grads_ready gets a clear error, not unreduced gradients.
    for h in hooks:
        h.remove()
    x, y = data[0]
    paged(x, y).backward()
    assert handle.phase is Phase.DEVICE
    with pytest.raises(LMSError, match="grads_ready"):
        torch.optim.SGD(paged.parameters(), lr=0.1).step()
    grads_ready(paged_params)
    assert handle.phase is Phase.HOST
    handle.remove()


def test_host_limit_exhaustion_raises_before_anything_changes():
    _, paged = pair()
    before = {n: p.data_ptr() for n, p in paged.named_parameters()}
    with pytest.raises(LMSError, match="host_limit"):
        attach_weight_paging(paged, runtime(host_limit=LIMIT))
    assert {n: p.data_ptr() for n, p in paged.named_parameters()} == before
    assert not paged._forward_pre_hooks


def test_bad_use_gets_clear_errors():
    _, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    with pytest.raises(LMSError, match="assign"):
        paged.load_state_dict(paged.state_dict(), assign=True)
    opt = torch.optim.AdamW(paged.parameters(), lr=1e-2, capturable=True)
    ((x, y),) = batches(1)
    paged(x, y).backward()
    with pytest.raises(LMSError, match="capturable"):
        opt.step()
    sparse = nn.Sequential(nn.Embedding(512, 64, sparse=True), nn.Linear(64, 4))
    with pytest.raises(LMSError, match="sparse"):
        attach_weight_paging(sparse, runtime())
    paged.wte.weight.data = paged.wte.weight.data.clone()  # replaced behind LMS's back
    with pytest.raises(LMSError, match="replaced"):
        paged(x, y)
    handle.remove()


def test_limit_too_small_for_one_module_names_it_and_changes_nothing():
    base, paged = pair()
    need = 2 * (paged.blocks[0].mlp.fc.weight.nbytes + paged.blocks[0].mlp.fc.bias.nbytes)
    with pytest.raises(LMSError, match=rf"module 'blocks.0.mlp.fc'.*\({need} bytes\)"):
        lms.enable(paged, limit=need - 1, min_size=0, weights=True)
    assert_same_params(base, paged)  # refused before anything moved
    assert all(p.untyped_storage().nbytes() == p.nbytes for p in paged.parameters())
    with lms.enable(paged, limit=need, min_size=0, weights=True) as handle:
        assert "blocks.0.mlp.fc.bias" in handle.weights.paged_names
        train(paged, torch.optim.SGD(paged.parameters(), lr=0.1), batches(1))
        train(base, torch.optim.SGD(base.parameters(), lr=0.1), batches(1))
    assert_same_params(base, paged)


def test_auto_pages_nothing_when_state_fits_and_false_never_pages():
    _, paged = pair()
    assert attach_weight_paging(paged, runtime(limit="1GiB", weights="auto")) is None
    assert attach_weight_paging(paged, runtime(limit=0, weights=False)) is None
    handle = attach_weight_paging(paged, runtime(limit=LIMIT, weights="auto"))
    assert handle is not None and handle.paged_names
    handle.remove()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_enable_pages_weights_and_activations_under_one_limit(autocast):
    base, paged = pair()
    handle = lms.enable(paged, limit=LIMIT, min_size="4KiB", weights="auto")
    assert handle.weights is not None and handle.weights.paged_names
    ctx = (lambda: torch.autocast("cpu", torch.bfloat16)) if autocast else contextlib.nullcontext
    data = batches(3)
    ob = torch.optim.AdamW(base.parameters(), lr=1e-2, fused=True)
    op = torch.optim.AdamW(paged.parameters(), lr=1e-2, fused=True)
    for x, y in data:
        for model, opt in ((base, ob), (paged, op)):
            with ctx():
                loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            model.last = loss.detach()
        assert torch.equal(base.last, paged.last)
    assert_same_params(base, paged)
    s = handle.stats()
    weight_grads = sum(pp.nbytes for pp in handle.weights.paged if pp.param.requires_grad)
    # Activations were swapped too: more went out than the paged gradients alone.
    assert s.swapped_out_bytes > 3 * weight_grads
    handle.remove()
    assert handle.weights.paged == []
    assert all(p.untyped_storage().nbytes() > 0 for p in paged.parameters())


@pytest.mark.parametrize("shared", [True, False], ids=["one_budget", "no_make_room"])
def test_weights_coming_in_push_activations_out_under_one_limit(shared, monkeypatch):
    # NOTE [Memory budget] Rule 6. Eight 64 KiB layers, each saving a 64 KiB input:
    # in forward, activations fill the limit and then every layer's weight must come
    # in. Without make_room the weight lands on top of them, over the limit.
    if not shared:
        monkeypatch.setattr(lms.runtime.MemoryBudget, "make_room", lambda self, extra: None)
    torch.manual_seed(0)
    layers = [nn.Linear(128, 128, bias=False) for _ in range(8)]
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())])
    base = copy.deepcopy(model)
    x = torch.randn(128, 128)
    limit = 256 * 1024
    with lms.enable(model, limit=limit, min_size="32KiB", weights=True) as handle:
        out = model(x)
        forward_peak = handle.stats().peak_resident_bytes
        out.square().mean().backward()
        base(x).square().mean().backward()
        for a, b in zip(base.parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad)
    if shared:
        assert forward_peak <= limit
    else:
        assert forward_peak > limit  # the failure this rule prevents


def test_enable_auto_leaves_weights_alone_when_they_fit():
    _, paged = pair()
    with lms.enable(paged, limit="1GiB", weights="auto") as handle:
        assert handle.weights is None


class FrozenMiddle(nn.Module):
    """A frozen layer between trainable ones: backward still needs its weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.frozen = nn.Linear(64, 64)
        self.frozen.requires_grad_(False)
        self.b = nn.Linear(64, 4)

    def forward(self, x, y):
        return F.cross_entropy(self.b(torch.tanh(self.frozen(torch.tanh(self.a(x))))), y)


class External(nn.Module):
    """Reads a child's weight directly in its own forward (outside the child's hooks)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 64)
        self.mid = nn.Linear(64, 64)

    def forward(self, x, y):
        h = torch.tanh(self.mid(self.emb(x)))
        return F.cross_entropy(h @ self.emb.weight.T, y)


def test_frozen_layer_in_the_middle_and_external_parameters():
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    base = FrozenMiddle()
    paged = copy.deepcopy(base)
    h = attach_weight_paging(paged, runtime(limit=0, min_size="1KiB"))
    data = [
        (torch.randn(8, 64, generator=g), torch.randint(4, (8,), generator=g)) for _ in range(3)
    ]
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    lb = train(base, torch.optim.AdamW(params(base), lr=1e-2), data)
    lp = train(paged, torch.optim.AdamW(params(paged), lr=1e-2), data)
    assert all(torch.equal(a, b) for a, b in zip(lb, lp))
    assert_same_params(base, paged)
    h.remove()

    torch.manual_seed(0)
    base = External()
    paged = copy.deepcopy(base)
    h = attach_weight_paging(paged, runtime(limit=0, min_size="1KiB"))
    x, y = torch.randint(64, (8,), generator=g), torch.randint(64, (8,), generator=g)
    # Undeclared, the parent's read is fetched by the guard (Rule 16), never wrong.
    with pytest.warns(UserWarning, match="register_external_parameter"):
        assert torch.equal(paged(x, y), base(x, y))
    h.register_external_parameter(paged, paged.emb.weight)
    data = [(x, y)] * 2
    lb = train(base, torch.optim.SGD(base.parameters(), lr=0.1), data)
    lp = train(paged, torch.optim.SGD(paged.parameters(), lr=0.1), data)
    assert all(torch.equal(a, b) for a, b in zip(lb, lp))
    assert_same_params(base, paged)
    with pytest.raises(LMSError, match="not part of the model"):
        h.register_external_parameter(nn.Linear(2, 2), paged.emb.weight)
    h.remove()


class FakeReducer:
    """A stand-in for ddl.wrap: reduces (here: halves) every gradient at the end of
    backward in a callback it queues itself, then announces them with grad_ready;
    under no_sync it announces each gradient from its hook without reducing."""

    def __init__(self, model, grad_ready=None):
        self.grad_ready, self.sync, self.seen = grad_ready, True, []
        self.hooks = [
            p.register_post_accumulate_grad_hook(self.on_grad) for p in model.parameters()
        ]

    def on_grad(self, p):
        if not self.sync:
            if self.grad_ready:
                self.grad_ready([p])
            return
        if not self.seen:
            torch.autograd.Variable._execution_engine.queue_callback(self.finalize)
        self.seen.append(p)

    def finalize(self):
        with torch.no_grad():
            for p in self.seen:
                p.grad.mul_(0.5)
        if self.grad_ready:
            self.grad_ready(self.seen)
        self.seen = []


def test_deferred_offload_with_accumulation_and_a_reducer_finishing_late():
    base, paged = pair()
    handle = attach_weight_paging(paged, runtime())  # before the reducer: its hooks run first
    rb, rp = FakeReducer(base), FakeReducer(paged, handle.defer_grad_offload())
    ob = torch.optim.AdamW(base.parameters(), lr=1e-2)
    op = torch.optim.AdamW(paged.parameters(), lr=1e-2)
    data = batches(6)
    for i in range(0, 6, 3):
        for j, (x, y) in enumerate(data[i : i + 3]):
            for model, red in ((base, rb), (paged, rp)):
                red.sync = j == 2  # no_sync for the first two micro-batches
                model(x, y).backward()
        for opt in (ob, op):
            opt.step()
            opt.zero_grad()
        assert handle.phase is Phase.HOST
    assert_same_params(base, paged)
    handle.remove()


@pytest.mark.parametrize("closed", ["between_steps", "before_the_announcement"])
def test_closing_grads_ready_lets_lms_train_on_without_the_reducer(closed):
    # ddl's remove() closes what defer_grad_offload returned. Was: LMS kept waiting for
    # announcements that never came, and the next optimizer step raised LMSError.
    base, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    ready = handle.defer_grad_offload()
    reducers = [FakeReducer(base), FakeReducer(paged, ready)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (base, paged)]
    data = batches(4)
    for i, (x, y) in enumerate(data):
        if i == 1:
            for red in reducers:  # the reducer goes away...
                for h in red.hooks:
                    h.remove()
            if closed == "between_steps":
                ready.close()
        for model, opt in zip((base, paged), opts):
            model(x, y).backward()
            if i == 1 and model is paged and closed == "before_the_announcement":
                # ...after LMS's hooks made it wait for an announcement of this backward.
                assert handle.phase is Phase.DEVICE
                ready.close()
            opt.step()
            opt.zero_grad()
        assert handle.phase is Phase.HOST
    assert_same_params(base, paged)
    ready.close()  # idempotent
    handle.remove()


def test_a_closed_reducer_leaves_the_other_deferring_one_waited_for():
    _, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    first, second = handle.defer_grad_offload(), handle.defer_grad_offload()
    first.close()
    ((x, y),) = batches(1)
    paged(x, y).backward()
    with pytest.raises(LMSError, match="grads_ready"):
        torch.optim.SGD(paged.parameters(), lr=0.1).step()
    second([p for p in paged.parameters()])
    assert handle.phase is Phase.HOST
    handle.remove()


def test_a_closed_grads_ready_called_again_announces_nothing():
    # A reducer closed (its handle removed), a new one deferring, and the old callable
    # still called (a hook left behind). Was: the old call sent the gradients the new
    # reducer was about to reduce, which then wrote into LMS's placeholder (RuntimeError).
    base, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    old = handle.defer_grad_offload()
    old.close()
    FakeReducer(base)
    FakeReducer(paged, handle.defer_grad_offload())
    FakeReducer(paged, old).sync = False  # announces each gradient from its hook
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (base, paged)]
    for x, y in batches(2):
        for model, opt in zip((base, paged), opts):
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
        assert handle.phase is Phase.HOST
    assert_same_params(base, paged)
    handle.remove()


def test_reducer_hooks_before_lms_with_accumulation_is_refused():
    _, paged = pair()
    red = FakeReducer(paged)  # registered first: would reduce a partial gradient
    handle = attach_weight_paging(paged, runtime())
    red.grad_ready = handle.defer_grad_offload()
    (x, y), (x2, y2) = batches(2)
    red.sync = False
    paged(x, y).backward()  # no accumulated gradient yet: fine in either order
    with pytest.raises(LMSError, match="before ddl.wrap"):
        paged(x2, y2).backward()
    handle.remove()


def test_learned_order_turns_demand_fetches_into_prefetches():
    _, paged = pair()
    handle = attach_weight_paging(paged, runtime(limit="1MiB"))
    data = batches(3)
    opt = torch.optim.SGD(paged.parameters(), lr=0.1)
    train(paged, opt, data[:1])
    first = (handle.prefetched, handle.on_demand)
    assert first[1] > first[0]  # nothing learned yet: forward fetches on demand
    train(paged, opt, data[1:])
    later = (handle.prefetched - first[0], handle.on_demand - first[1])
    assert later[0] > 2 * later[1], (first, later)  # following the learned order
    handle.remove()


def test_machine_memory_exhaustion_raises_up_front(monkeypatch):
    import lms.weights as weights

    _, paged = pair()
    monkeypatch.setattr(weights, "_mem_available", lambda: 4096)
    with pytest.raises(LMSError, match="available"):
        attach_weight_paging(paged, runtime())
    assert not paged._forward_pre_hooks


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_between_forward_and_backward(set_to_none):
    # A common loop: loss = model(x); opt.zero_grad(); loss.backward(); opt.step().
    # zero_grad runs while the parameters point at their device shells, and must
    # still clear what the host accumulator holds.
    base, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    ob = torch.optim.SGD(base.parameters(), lr=0.1, momentum=0.9)
    op = torch.optim.SGD(paged.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches(3):
        for model, opt in ((base, ob), (paged, op)):
            loss = model(x, y)
            opt.zero_grad(set_to_none=set_to_none)
            loss.backward()
            opt.step()
    assert_same_params(base, paged)
    handle.remove()


@pytest.mark.parametrize("together", [True, False], ids=["one_backward", "two_backwards"])
def test_two_forwards_before_backward(together):
    base, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    data = batches(4)
    for model in (base, paged):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for (x1, y1), (x2, y2) in zip(data[::2], data[1::2]):
            l1, l2 = model(x1, y1), model(x2, y2)  # both graphs alive at once
            if together:
                (l1 + l2).backward()
            else:
                l1.backward()  # ends a backward (host phase) while l2's graph waits
                l2.backward()
            opt.step()
            opt.zero_grad()
    assert_same_params(base, paged)
    handle.remove()


def test_a_forward_that_raises_leaves_nothing_resident():
    base, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    (x, y), (x2, y2) = batches(2)
    with pytest.raises(IndexError):
        paged(torch.full_like(x, 10**6), y)  # token ids out of range
    assert handle.phase is Phase.HOST
    assert handle.rt.budget.resident_bytes == 0
    lb = train(base, torch.optim.SGD(base.parameters(), lr=0.1), [(x2, y2)])
    lp = train(paged, torch.optim.SGD(paged.parameters(), lr=0.1), [(x2, y2)])
    assert torch.equal(lb[0], lp[0])
    assert_same_params(base, paged)
    handle.remove()


def test_backward_under_autocast_fetches_no_linear_or_embedding_weight():
    # Rule 11: autocast saves a bf16 cast of each Linear weight and an Embedding's
    # gradient needs only the indices, so backward reads none of the paged weights
    # (the LayerNorms are below min_size and stay resident).
    base, paged = pair()
    handle = attach_weight_paging(paged, runtime())
    ((x, y),) = batches(1)
    stats = handle.rt.stats

    def bytes_in(fn):
        before = stats.swapped_in_bytes
        fn()
        return stats.swapped_in_bytes - before

    def step(model):
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        return loss.detach()

    def forward_only():
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            paged(x, y)

    assert bytes_in(lambda: step(paged)) == bytes_in(forward_only) > 0
    paged.zero_grad()
    assert torch.equal(step(base), step(paged))  # and the gradients are still right
    for a, b in zip(base.parameters(), paged.parameters()):
        assert torch.equal(a.grad, b.grad)
    # Without autocast a Linear's backward needs its weight: those are fetched again.
    assert bytes_in(lambda: paged(x, y).backward()) > bytes_in(forward_only)
    handle.remove()


def test_deepcopy_and_pickle_come_without_lms_with_the_real_values():
    # NOTE [Weight paging] Rule 12: an EMA model or the best checkpoint so far is a
    # copy of the model; it must not drag the pager (locks, host pool) along.
    base, paged = pair()
    first, later = batches(1), batches(1, seed=2)
    with lms.enable(paged, limit=LIMIT, min_size="4KiB", weights=True) as handle:
        assert isinstance(handle.weights, lms.WeightPaging)  # exported for type hints
        train(base, torch.optim.SGD(base.parameters(), lr=0.1), first)
        train(paged, torch.optim.SGD(paged.parameters(), lr=0.1), first)
        twin = copy.deepcopy(paged)  # between steps: parameters point at the masters
        restored = pickle.loads(pickle.dumps(paged))
        ((x, y),) = first
        loss = paged(x, y)  # backward pending: paged parameters are released shells
        assert handle.weights.phase is Phase.DEVICE
        assert paged.blocks[0].mlp.fc.weight.untyped_storage().nbytes() == 0
        mid = copy.deepcopy(paged)
        block = copy.deepcopy(paged.blocks[0])  # a submodule alone, too
        assert_same_params(base.blocks[0], block)
        with pytest.raises(LMSError, match="between steps"):
            pickle.dumps(paged)
        loss.backward()
        swaps = handle.stats().swap_ins
        for other in (twin, restored, mid):
            assert_same_params(base, other)  # the real values, not the empty shells
            assert other.head.weight is other.wte.weight  # still tied
            plain = copy.deepcopy(base)
            lo = train(other, torch.optim.SGD(other.parameters(), lr=0.1), later)
            lp = train(plain, torch.optim.SGD(plain.parameters(), lr=0.1), later)
            assert all(torch.equal(a, b) for a, b in zip(lo, lp)), (lo, lp)
            assert_same_params(plain, other)
            assert handle.stats().swap_ins == swaps  # the copies are not managed by LMS
        lms.enable(twin, limit=LIMIT, min_size="4KiB", weights=True).remove()


class RootWeight(nn.Module):
    """A paged weight owned by the root module itself, used first in forward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64))
        self.body = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])

    def forward(self, x):
        return self.body(x @ self.w)


def test_deepcopy_of_a_root_owned_paged_weight_while_released():
    torch.manual_seed(0)
    model = RootWeight()
    want = copy.deepcopy(model)
    with lms.enable(model, limit="40KiB", min_size=0, weights=True) as handle:
        loss = model(torch.randn(2, 64)).sum()
        assert handle.weights.phase is Phase.DEVICE
        assert model.w.untyped_storage().nbytes() == 0  # released: the copy must not read it
        twin = copy.deepcopy(model)
        assert_same_params(want, twin)
        with pytest.raises(LMSError, match="between steps"):
            pickle.dumps(model)
        loss.backward()
