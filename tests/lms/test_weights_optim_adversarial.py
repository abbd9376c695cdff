"""The host optimizer step under optimizer settings a demanding user picks.

Each parity test trains a model without LMS and a deep copy with ``lms.enable``
(``weights=True``, ``limit=0``, ``min_size=0`` unless said otherwise: every
parameter paged) on the same data for a few steps, and asserts that losses and
parameters are bitwise equal (``torch.equal``). NOTE [Host optimizer step] in
lms/weights_optim.py has the rules these check.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from paged_twins import enable_paging as enable
from paged_twins import twins
from torch import nn, optim

from lms.errors import LMSError
from lms.weights_optim import check_host_step, move_state

pytestmark = pytest.mark.filterwarnings("ignore:.*without fused=True")


class Net(nn.Module):
    """An MLP with a branch that only some steps use (its parameters get no grad then)."""

    def __init__(self, d=16, n=3, out=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.branch = nn.Linear(d, d)
        self.head = nn.Linear(d, out)
        self.use_branch = False

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        if self.use_branch:
            x = torch.tanh(self.branch(x))
        return self.head(x)


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 16, generator=g), torch.randint(4, (8,), generator=g)) for _ in range(n)
    ]


def both(loop, **kw):
    """Run ``loop(model)`` without and with LMS; its returned tensors and the params must match."""
    base, paged = twins(Net)
    enable(paged, **kw)
    lb, lp = loop(base), loop(paged)
    assert len(lb) == len(lp)
    for a, b in zip(lb, lp):
        # Bitwise, NaN included (a grad norm of overflowed fp16-scaled grads is NaN).
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    sa, sb = base.state_dict(), paged.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def plain_loop(make_opt, steps=3):
    def loop(model):
        opt = make_opt([p for n, p in model.named_parameters() if not n.startswith("branch")])
        out = []
        for x, y in data(steps):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.detach())
        return out

    return loop


# -- update rules ----------------------------------------------------------------

UPDATE_RULES = {
    "adam_amsgrad": lambda ps: optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adam_amsgrad_fused": lambda ps: optim.Adam(ps, lr=1e-2, amsgrad=True, fused=True),
    "adamw_maximize_foreach": lambda ps: optim.AdamW(ps, lr=1e-2, maximize=True, foreach=True),
    "adamw_maximize_fused": lambda ps: optim.AdamW(ps, lr=1e-2, maximize=True, fused=True),
    "adam_tensor_lr_fused": lambda ps: optim.Adam(ps, lr=torch.tensor(1e-2), fused=True),
    "adam_decoupled_wd": lambda ps: optim.Adam(
        ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, foreach=False
    ),
    "sgd_nesterov_wd": lambda ps: optim.SGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
    "sgd_dampening_foreach": lambda ps: optim.SGD(
        ps, lr=0.1, momentum=0.9, dampening=0.5, foreach=True
    ),
    "sgd_fused": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "adagrad_fused": lambda ps: optim.Adagrad(ps, lr=0.1, fused=True),
    "adagrad_lr_decay": lambda ps: optim.Adagrad(ps, lr=0.1, lr_decay=0.01, weight_decay=0.1),
    "rmsprop_centered": lambda ps: optim.RMSprop(ps, lr=1e-2, momentum=0.9, centered=True),
    "adamax": lambda ps: optim.Adamax(ps, lr=1e-2, foreach=True),
    "nadam": lambda ps: optim.NAdam(ps, lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1),
    "radam": lambda ps: optim.RAdam(ps, lr=1e-2),
    "adadelta": lambda ps: optim.Adadelta(ps, lr=1.0),
    "asgd": lambda ps: optim.ASGD(ps, lr=1e-2, t0=1),
    "rprop": lambda ps: optim.Rprop(ps, lr=1e-2),
    "adafactor": lambda ps: optim.Adafactor(ps, lr=1e-2),
}


@pytest.mark.parametrize("name", sorted(UPDATE_RULES))
def test_update_rules_match_bitwise(name):
    both(plain_loop(UPDATE_RULES[name]))


def test_fused_adamw_over_a_group_of_paged_and_resident_params():
    # 1 KiB weights are paged, 64 B biases stay resident: one group spans both.
    both(plain_loop(lambda ps: optim.AdamW(ps, lr=1e-2, fused=True)), limit="2KiB", min_size=100)


# -- closures, scalers, schedulers -----------------------------------------------


@pytest.mark.parametrize("limit,min_size", [(0, 0), ("2KiB", 100)])
def test_lbfgs_strong_wolfe_closure(limit, min_size):
    # The line search steps the masters in place between closure calls.
    def loop(model):
        params = [p for n, p in model.named_parameters() if not n.startswith("branch")]
        opt = optim.LBFGS(params, lr=0.5, max_iter=4, line_search_fn="strong_wolfe")
        out = []
        for x, y in data(3):

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            out.append(opt.step(closure).detach())
        return out

    both(loop, limit=limit, min_size=min_size)


def test_lbfgs_over_two_devices_is_refused_with_advice():
    # On an accelerator paged parameters step on the host and resident ones on the
    # device; LBFGS would torch.cat them. "meta" stands in for the device here.
    host, dev = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))
    with pytest.raises(LMSError, match="LBFGS.*min_size=0"):
        check_host_step(optim.LBFGS([host, dev]), {id(host): None})
    check_host_step(optim.LBFGS([host]), {id(host): None})  # one device: fine


def test_lbfgs_history_made_before_enable_moves_with_the_state():
    # LBFGS keeps old_dirs/old_stps/ro as lists of tensors; on an accelerator a
    # history left on the device would meet host gradients in the next step.
    # "meta" stands in for the host here.
    p = nn.Parameter(torch.randn(4))
    opt = optim.LBFGS([p], max_iter=3)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[p]
    assert state["old_dirs"] and state["ro"]  # the steps built a history
    move_state(opt, {id(p): None}, lambda _: torch.device("meta"), to_host=True)
    for key in ("old_dirs", "old_stps", "ro", "d", "prev_flat_grad"):
        values = state[key] if isinstance(state[key], list) else [state[key]]
        assert all(v.device.type == "meta" for v in values), key


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_fp16_with_skipped_steps_and_clipping(fused):
    # init_scale overflows the fp32 grads at first, so scaler.step skips the
    # optimizer (no pre-hook) until update() has backed the scale off.
    def loop(model):
        opt = optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=1e38, backoff_factor=2.0**-70)
        out = []
        for x, y in data(4):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            out.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            out += [loss.detach(), torch.tensor(scaler.get_scale())]
        return out

    both(loop)


def test_one_cycle_schedule_and_averaged_model():
    def loop(model):
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10)
        avg = optim.swa_utils.AveragedModel(model)
        out = []
        for x, y in data(3):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            avg.update_parameters(model)  # reads the masters between steps
            opt.zero_grad()
            out.append(loss.detach())
        return out + [p.detach().clone() for p in avg.parameters()]

    both(loop)


# -- what the loop does around the step ------------------------------------------


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_branch_used_only_in_some_steps(set_to_none):
    # With set_to_none=True the branch has no .grad in the steps it sits out, and
    # Adam skips it; with False it steps on zeros (and its moments decay).
    def loop(model):
        opt = optim.Adam(model.parameters(), lr=1e-2)
        out = []
        for i, (x, y) in enumerate(data(5)):
            model.use_branch = i in (1, 3)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
            out.append(loss.detach())
        return out

    both(loop)


def test_eval_forward_and_logging_between_backward_and_step():
    def loop(model):
        params = [p for n, p in model.named_parameters() if not n.startswith("branch")]
        opt = optim.AdamW(params, lr=1e-2)
        out = []
        for x, y in data(3):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            with torch.no_grad():
                out.append(F.cross_entropy(model(x), y))
            out.append(torch.stack([p.grad.norm() for p in params]))
            out.append(torch.stack([p.data.sum() for p in params]))
            opt.step()
            opt.zero_grad()
            out.append(loss.detach())
        return out

    both(loop)


def test_optimizer_made_and_reloaded_between_forward_and_backward():
    # In phase DEVICE ``.data`` is the shell; state the optimizer creates or loads
    # then must still end up stepping the masters.
    def loop(model):
        params = [p for n, p in model.named_parameters() if not n.startswith("branch")]
        opt = None
        out = []
        for i, (x, y) in enumerate(data(4)):
            loss = F.cross_entropy(model(x), y)
            if opt is None:
                opt = optim.Adam(params, lr=1e-2, amsgrad=True, fused=True)
            if i == 2:
                state = copy.deepcopy(opt.state_dict())
                opt = optim.Adam(params, lr=1e-2, amsgrad=True, fused=True)
                opt.load_state_dict(state)
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.detach())
        return out

    both(loop)


def test_hand_written_sgd_without_an_optimizer():
    # No optimizer, so no step pre-hook: the in-place update runs in phase HOST.
    def loop(model):
        params = [p for n, p in model.named_parameters() if not n.startswith("branch")]
        out = []
        for x, y in data(3):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            with torch.no_grad():
                for p in params:
                    p -= 0.1 * p.grad
                    p.grad = None
            out.append(loss.detach())
        return out

    both(loop)


def test_reassigning_param_data_in_a_hand_written_step_is_refused_clearly():
    _, paged = twins(Net)
    enable(paged)
    x, y = data(1)[0]
    F.cross_entropy(paged(x), y).backward()
    w = paged.layers[0].weight
    w.data = w.data - 0.1 * w.grad
    with pytest.raises(LMSError, match="param.data = "):
        paged(x)


def test_gan_discriminator_step_before_generator_backward():
    # The DCGAN tutorial's loop: G's forward, D's step, then G's backward through D.
    # Without LMS this is valid (optD never touches G's parameters).
    class GAN(nn.Module):
        def __init__(self):
            super().__init__()
            self.G = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
            self.D = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))

    def loop(gan):
        o_g, o_d = optim.Adam(gan.G.parameters(), lr=1e-2), optim.Adam(gan.D.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(3)
        out = []
        for _ in range(3):
            z, real = torch.randn(8, 8, generator=g), torch.randn(8, 16, generator=g)
            o_d.zero_grad()
            fake = gan.G(z)
            loss_d = F.softplus(-gan.D(real)).mean() + F.softplus(gan.D(fake.detach())).mean()
            loss_d.backward()
            o_d.step()
            o_g.zero_grad()
            loss_g = F.softplus(-gan.D(fake)).mean()
            loss_g.backward()
            o_g.step()
            out += [loss_d.detach(), loss_g.detach()]
        return out

    torch.manual_seed(0)
    base = GAN()
    paged = copy.deepcopy(base)
    enable(paged)
    for a, b in zip(loop(base), loop(paged)):
        assert torch.equal(a, b)
