import copy
import warnings

import pytest
import torch

from benchmarks.common import real_classnames
from benchmarks.launches import compile_requests, device_ops, gpu_backends, triton_variants
from conftest import DEVICE, needs_kernel
from fastcoop.cache import FeatureCache, extract_features
from fastcoop.datasets import read_dataset
from fastcoop.prompts import PromptLearner
from fastcoop.methods.coop import CoOpLoss
from fastcoop.step import SGD, Adam, TrainStep, sgd_update_
from fastcoop.text_encoder import FastTextEncoder
from fastcoop.text_tower import TextTower
from fastcoop.config import Recipe, Runtime
from fastcoop.training import train


def test_sgd_update_equals_torch_sgd():
    torch.manual_seed(0)
    ours = torch.randn(5, 7)
    theirs = torch.nn.Parameter(ours.clone())
    optimizer = torch.optim.SGD([theirs], lr=0.01, momentum=0.9, weight_decay=5e-4)
    buffer = torch.zeros_like(ours)
    for i in range(20):
        grad = torch.randn(5, 7)
        lr = 0.01 * (1 + i % 3)
        optimizer.param_groups[0]["lr"] = lr
        theirs.grad = grad.clone()
        optimizer.step()
        sgd_update_([ours], [grad], [buffer], torch.tensor([lr]), 0.9, 5e-4)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-7)


def test_adam_update_equals_torch_adam():
    """Dassl's Adam (torch.optim.Adam, betas 0.9 and 0.999, weight decay added to the gradient) against fastcoop's
    fused update with the lr a device tensor, over steps of changing lr, for two tensors of a learner."""
    torch.manual_seed(0)
    ours = [torch.randn(5, 7), torch.randn(3)]
    theirs = [torch.nn.Parameter(t.clone()) for t in ours]
    start = ours[0].clone()
    optimizer = torch.optim.Adam(theirs, lr=2e-3, weight_decay=5e-4, betas=(0.9, 0.999))
    adam = Adam(weight_decay=5e-4)
    states = [adam.new_state(t) for t in ours]
    state = {name: [s[name] for s in states] for name in Adam.state_names}
    for i in range(20):
        grads = [torch.randn_like(t) for t in ours]
        lr = 2e-3 * (1 + i % 3)
        optimizer.param_groups[0]["lr"] = lr
        for param, grad in zip(theirs, grads):
            param.grad = grad.clone()
        optimizer.step()
        adam.update_(ours, grads, state, torch.tensor([lr]))
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference.detach(), rtol=1e-5, atol=1e-7)
    assert state["step"][0].item() == 20 and (ours[0] - start).abs().min() > 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("csc, position", [(False, "end"), (True, "front")])
def test_cuda_graph_equals_eager(tmp_path, tiny_vit, example_images, csc, position):
    path = extract_features(read_dataset(example_images), tmp_path / "f.h5", tiny_vit, shots=4, seeds=[1], views=2,
                            batch_size=32, workers=0, progress=False)
    loaded = copy.deepcopy(tiny_vit)  # training moves the text tower to the GPU: keep the shared fixture on CPU
    contexts = []
    for graph in (False, True):
        recipe = Recipe(shots=4, seed=1, n_ctx=4, csc=csc, position=position, epochs=5, batch_size=16,
                        precision="fp32")
        runtime = Runtime(device="cuda", impl_detail=() if graph else (("step", "eager"),))
        with FeatureCache(path) as cache, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(cache, loaded, recipe, runtime, progress=False)
            contexts.append(result.learner.ctx.detach().cpu())
        assert not any("capture failed" in str(w.message) for w in caught)  # the graph really ran
        # the first epoch's parts a graphed step adds, timed
        assert (result.kernels_seconds > 0, result.capture_seconds > 0) == (graph, graph)
    torch.testing.assert_close(contexts[1], contexts[0], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["coop", "cocoop", "coop-variants"])
def test_stacked_runs_in_a_cuda_graph_equal_each_run_alone_eager(tmp_path, tiny_vit, example_images, method):
    """Runs of two seeds and different shot counts and epochs stacked into one graphed step (their contexts as
    more attention heads of one encoder pass; captured again as runs finish) against each run trained alone
    without a graph; CoOp, CoCoOp (per-image contexts, Meta-Net), and CoOp runs of three prompt layouts."""
    from fastcoop.training import train_stack

    path = extract_features(read_dataset(example_images), tmp_path / "f.h5", tiny_vit, shots=[1, 4], seeds=[1, 2],
                            views=2, batch_size=32, workers=0, progress=False)
    loaded = copy.deepcopy(tiny_vit)
    layouts = [dict(n_ctx=4), dict(n_ctx=2, csc=True), dict(n_ctx=4, position="middle")] \
        if method == "coop-variants" else [{}] * 3
    recipes = [Recipe(method=method.removesuffix("-variants"), shots=shots, seed=seed, epochs=epochs, batch_size=4,
                      lr=0.05, precision="fp32", **layout)
               for (shots, seed, epochs), layout in zip(((4, 1, 3), (1, 2, 2), (4, 2, 4)), layouts)]
    with FeatureCache(path) as cache, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stacked = train_stack(cache, loaded, recipes, Runtime(device="cuda"), progress=False)
        alone = [train(cache, loaded, recipe, Runtime(device="cuda", impl_detail=(("step", "eager"),)),
                       progress=False) for recipe in recipes]
    assert not any("capture failed" in str(w.message) for w in caught)
    for together, by_itself in zip(stacked, alone):
        for name, theirs in by_itself.learner.trainable().items():
            torch.testing.assert_close(together.learner.trainable()[name].detach().cpu(), theirs.detach().cpu(),
                                       rtol=1e-5, atol=1e-6)


def gpu_step(tiny_vit, classnames, images: int = 8, layouts=((4, False, "end"),)) -> TrainStep:
    """A training step as a GPU runs it (Triton kernels, bf16 weights under autocast), on the tiny ViT: a run of
    each prompt layout (n_ctx, csc, position), stacked."""
    model = copy.deepcopy(tiny_vit.model).to(DEVICE)
    learners = [PromptLearner(model, tiny_vit.tokenizer, classnames, n_ctx=n, csc=csc, position=position).to(DEVICE)
                for n, csc, position in layouts]
    backends = gpu_backends(model)
    encode = FastTextEncoder(model, learners, backends, weight_dtype=torch.bfloat16)
    runs = len(learners)
    features = torch.randn(runs, images, model.visual.output_dim, device=DEVICE)
    labels = (torch.arange(images, device=DEVICE)[None] % len(classnames)).repeat(runs, 1)
    loss = CoOpLoss(encode, model.logit_scale.exp().detach(), torch.bfloat16, backends.loss)
    return TrainStep(learners, loss, features, labels,
                     torch.randperm(images, device=DEVICE).view(1, 1, 2, images // 2).repeat(runs, 1, 1, 1),
                     torch.full((runs, 1), 0.002, device=DEVICE), SGD(0.9, 5e-4))


@needs_kernel
def test_the_gpu_step_stays_within_its_launch_budget(tiny_vit):
    """The step's device operations counted (benchmarks/launches.py): 17 per block (4 products and 4 Triton
    launches forward, 4 products, 4 Triton launches and the activation's backward back), 26 outside the blocks,
    and none of the operations that cost a GPU extra kernels for nothing: casts but the loss's of the text
    features (fp32 for the cached features, and the gradient back), indexing (its gradient sorts), zero-filled or
    all-ones gradients."""
    step = gpu_step(tiny_vit, ["dog", "sea lion", "kite (bird of prey)"])
    step()
    ops = device_ops(step)
    blocks = len(TextTower.of(tiny_vit.model).blocks)
    assert sum(ops.values()) <= 17 * blocks + 26, ops
    assert ops["_to_copy"] <= 2 and not set(ops) & {"index", "index_put", "select_backward", "zeros", "ones_like"}, ops


@pytest.mark.slow
@needs_kernel
def test_stacked_runs_share_every_op_of_the_blocks(tiny_vit):
    """Runs stacked in one step: the blocks' products, norms, activations and attention run once for all of them
    (the attention kernel addresses each run's heads in place: no copies), and their losses and metrics in one set
    of launches, so a run more adds only its SGD update; a run of another prompt layout adds its own attention (forward,
    backward, the prefix's partial sums) and the join of the attention's outputs each way, 5 per block."""
    classnames = ["dog", "sea lion", "kite (bird of prey)"]
    end, middle = (4, False, "end"), (2, True, "middle")

    def counted(layouts) -> int:
        step = gpu_step(tiny_vit, classnames, layouts=layouts)
        step()  # the first call may do one-off work
        return sum(device_ops(step).values())
    alone, same, five, other = (counted(layouts) for layouts in ((end,), (end, end), (end,) * 5, (end, middle)))
    blocks = len(TextTower.of(tiny_vit.model).blocks)
    assert five - same <= 3 and same - alone <= 1 + 1, (alone, same, five)  # + 1: the contexts stacked
    assert same < other <= same + 5 * blocks + 4, (same, other)


@pytest.mark.slow
@needs_kernel
def test_one_set_of_triton_kernels_serves_every_dataset_size(tiny_vit):
    """A warm kernel cache serves a dataset of any size: the step's Triton launches need the same compiled
    variants whatever the number of classes, packed rows, attention segments and loss splits (Triton would
    specialise on sizes that are 1 or multiples of 16; here 17 classes take one loss split, 40 and 100 more).
    What may differ is chosen, not specialised: the attention's tile height follows how the rows pack (64 once
    a dataset has more than a handful of classes)."""
    variants = [triton_variants(gpu_step(tiny_vit, real_classnames(classes))) for classes in (17, 40, 100)]
    assert variants[0] == variants[1] == variants[2]


@needs_kernel
def test_compiling_in_parallel_asks_for_every_kernel_and_runs_none(tiny_vit):
    """What CudaGraphStep does before capture: the step once more with each Triton launch turned into a compile
    (in a pool of threads on a GPU; the interpreter has nothing to compile). Every launch the step makes is asked
    for, none runs, and the PyTorch operators between them run as usual."""
    from fastcoop.kernels import compiling_in_parallel

    step = gpu_step(tiny_vit, real_classnames(17))
    saved = [t.clone() for t in step.state()]
    inside = {}
    with compiling_in_parallel(torch.device(DEVICE)):
        asked = compile_requests(lambda: inside.update(device_ops(step)))
    for tensor, value in zip(step.state(), saved):  # what it computed from unwritten outputs, undone
        tensor.copy_(value)
    outside = device_ops(step)
    launched = {name: n for name, n in outside.items() if name.startswith("triton ")}
    assert launched and not any(name.startswith("triton ") for name in inside)
    assert asked == {name.removeprefix("triton "): n for name, n in launched.items()}
    assert inside == {name: n for name, n in outside.items() if not name.startswith("triton ")}


@pytest.mark.slow
@needs_kernel
def test_stacked_runs_need_no_kernels_of_their_own(tiny_vit):
    """Runs stacked in one step (a sweep's seeds) are more heads of the same attention launches: 8 runs of the tiny
    ViT's 2 heads make 16, a multiple of 16 that Triton would specialise on."""
    model = copy.deepcopy(tiny_vit.model).to(DEVICE)
    learner = PromptLearner(model, tiny_vit.tokenizer, real_classnames(17), n_ctx=4).to(DEVICE)
    encode = FastTextEncoder(model, learner, gpu_backends(model), weight_dtype=torch.bfloat16)

    def forward_backward(runs: int):
        contexts = learner.ctx.detach().expand(runs, -1, -1).clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            features = encode(contexts)
        features.float().sum().backward()
    assert triton_variants(lambda: forward_backward(1)) == triton_variants(lambda: forward_backward(8))
