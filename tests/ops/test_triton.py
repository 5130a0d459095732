"""The triton backend's kernels against the sequential reference: h, grad a, b, h0.

CI has no GPU, so the kernels run on CPU tensors under Triton's interpreter. Triton
picks the interpreter from TRITON_INTERPRET=1 before it is first imported, for the
whole process, so every case runs in one subprocess (triton_worker.py) that returns
outputs and gradients; they are compared here, where the references are computed.
Where CUDA is present the same cases also run compiled, in this process.

Tiles are kept small (block_t=8, block_c=2 on 3 channels) so that short sequences
already span several tiles and a partial channel block; a few cases use the default tiles.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minrnn
import minrnn.functional as MF
from minrnn.ops import BACKENDS
from minrnn.ops.cells import get_cell

from ..conftest import TOL, assert_close_scaled, make_scan_inputs, run_with_grads
from .test_document_resets import per_document

HAS_TRITON = importlib.util.find_spec("triton") is not None
LENGTHS = [1, 2, 3, 17, 64, 129]
HALF_TOL = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}  # as tests/ops/test_scan.py


def _spec(name, T, dtype, with_h0=True, B=2, C=3, block_t=8, block_c=2, **extra):
    return dict(name=name, B=B, T=T, C=C, dtype=dtype, with_h0=with_h0, block_t=block_t, block_c=block_c, **extra)


SPECS = (
    [_spec(f"{str(dt)[6:]}-T{T}-{'h0' if h else 'noh0'}", T, dt, h)
     for dt in (torch.float64, torch.float32) for T in LENGTHS for h in (True, False)]
    + [_spec("default-tiles-T1-noh0", 1, torch.float32, False, block_t=None, block_c=None),
       _spec("default-tiles-T40-h0", 40, torch.float32, True, block_t=None, block_c=None)]
    + [_spec(f"{str(dt)[6:]}-T129-{'h0' if h else 'noh0'}", 129, dt, h, C=5, block_t=16, block_c=4)
       for dt in (torch.float16, torch.bfloat16) for h in (True, False)]
    + [_spec("signed-decays", 40, torch.float64, decays="signed"),
       _spec("saturated-gates", 300, torch.float32, block_t=32, block_c=4, decays="saturated"),
       _spec("non-contiguous-inputs-and-expanded-grad", 37, torch.float64, non_contiguous=True, sum_loss=True)]
)
# the fused cells: pre-activations of size ~3 (gates from ~0.05 to ~0.95, both branches of g)
CELL_SPECS = (
    [_spec(f"{cell}{'' if norm else '-unnormalized'}-{str(dt)[6:]}-T{T}-{'h0' if h else 'noh0'}", T, dt, h,
           cell=cell.split("-")[0], normalize=norm)
     for cell, norm in (("mingru", False), ("minlstm", True), ("minlstm", False))
     for dt in (torch.float64, torch.float32) for T in (1, 17, 129) for h in (True, False)]
    + [_spec(f"{cell}-bfloat16-T129-h0", 129, torch.bfloat16, True, C=5, block_t=16, block_c=4, cell=cell,
             normalize=True) for cell in ("mingru", "minlstm")]
    + [_spec(f"{cell}-separate-inputs", 40, torch.float64, cell=cell, normalize=True, separate=True)
       for cell in ("mingru", "minlstm")]
    + [_spec(f"{cell}-default-tiles-T40", 40, torch.float32, block_t=None, block_c=None, cell=cell, normalize=True)
       for cell in ("mingru", "minlstm")]
    + [_spec(f"{cell}-saturated-pre-activations", 300, torch.float32, block_t=32, block_c=4, cell=cell,
             normalize=True, scale=50.0) for cell in ("mingru", "minlstm")]
    # the signed cells, which no fused kernel knows: the generic path (gates, then triton_scan
    # forward and in reverse for the backward), as minrnn.functional runs them on the GPU
    + [_spec(f"{cell}{'' if norm else '-unnormalized'}-{str(dt)[6:]}-T{T}-{'h0' if h else 'noh0'}", T, dt, h,
             cell=cell, normalize=norm)
       for cell, norm in (("mingru_signed", False), ("minlstm_signed", True), ("minlstm_signed", False))
       for dt in (torch.float64, torch.float32) for T in (1, 17, 129) for h in (True, False)]
    + [_spec(f"{cell}-saturated-pre-activations", 300, torch.float32, block_t=32, block_c=4, cell=cell,
             normalize=True, scale=50.0) for cell in ("mingru_signed", "minlstm_signed")]
)
# document starts (reset): random ones with row 0 starting one at t = 0 (h0 ignored, dh0 = 0),
# starts on both sides of a tile boundary (block_t = 8: steps 7, 8, 9), a start at every step
RESET_SPECS = (
    [_spec(f"{cell}{'' if norm else '-unnormalized'}-resets-{str(dt)[6:]}-T{T}-{'h0' if h else 'noh0'}", T, dt, h,
           cell=cell, normalize=norm, resets="random")
     for cell, norm, dt, T, h in (("mingru", False, torch.float64, 17, True),
                                  ("minlstm", True, torch.float64, 17, False),
                                  ("minlstm", False, torch.float64, 17, True),
                                  ("mingru", False, torch.float32, 129, True),
                                  ("minlstm", True, torch.float32, 129, True),
                                  ("mingru_signed", False, torch.float64, 17, True))]
    + [_spec(f"{cell}-resets-tile-boundary", 23, torch.float64, cell=cell, normalize=True, resets="tile-boundary")
       for cell in ("mingru", "minlstm")]
    + [_spec(f"{cell}-resets-every-step", 9, torch.float64, cell=cell, normalize=True, resets="every")
       for cell in ("mingru", "minlstm")]
    + [_spec(f"{cell}-resets-bfloat16-T129-h0", 129, torch.bfloat16, True, C=5, block_t=16, block_c=4, cell=cell,
             normalize=True, resets="random") for cell in ("mingru", "minlstm")]
    + [_spec("minlstm-resets-float16-T65-h0", 65, torch.float16, True, C=5, block_t=16, block_c=4, cell="minlstm",
             normalize=True, resets="random"),
       _spec("mingru-resets-default-tiles-T40", 40, torch.float32, block_t=None, block_c=None, cell="mingru",
             normalize=True, resets="random")]
)
CELL_SPECS = CELL_SPECS + RESET_SPECS
GRADCHECK_SPECS = [_spec("gradcheck-h0", 4, torch.float64, B=1, C=2, block_t=2),
                   _spec("gradcheck-noh0", 4, torch.float64, with_h0=False, B=1, block_t=2)]


def _cell_case(spec, device):
    n = get_cell(spec["cell"]).n_pre
    gen = torch.Generator().manual_seed(spec["T"] + 7 * n)
    B, T, C = spec["B"], spec["T"], spec["C"]
    parts = [spec.get("scale", 3.0) * torch.randn(B, T, C, generator=gen, dtype=torch.float64) for _ in range(n)]
    h0 = torch.randn(B, C, generator=gen, dtype=torch.float64) if spec["with_h0"] else None
    w = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    cast = lambda x: None if x is None else x.to(device=device, dtype=spec["dtype"])  # noqa: E731
    reset = _resets(spec.get("resets"), B, T, gen)
    return dict(cell=spec["cell"], normalize=spec["normalize"], inputs=(*map(cast, parts), cast(h0)),
                weight=cast(w), block_t=spec["block_t"], block_c=spec["block_c"],
                separate=spec.get("separate", False), gradcheck=False,
                reset=None if reset is None else reset.to(device))


def _resets(kind, B, T, gen):
    """(B, T) bool document starts of a kind (see RESET_SPECS), or None."""
    if kind is None:
        return None
    if kind == "every":
        return torch.ones(B, T, dtype=torch.bool)
    reset = torch.zeros(B, T, dtype=torch.bool)
    if kind == "tile-boundary":
        reset[0, [7, 8, 9]] = True
        reset[-1, [8, T - 1]] = True
    else:
        reset = torch.rand(B, T, generator=gen) < 0.2
        reset[0, 0] = True
        reset[-1, 0] = False
    return reset


def _case(spec, device="cpu"):
    """Inputs for a spec, rounded to its dtype, and the upstream weight (None: h.sum())."""
    if spec.get("cell"):
        return _cell_case(spec, device)
    a, b, h0 = make_scan_inputs(spec["B"], spec["T"], spec["C"], seed=spec["T"], with_h0=spec["with_h0"])
    if spec.get("decays") == "signed":  # of either sign, some above 1 in size
        a = 2.4 * a - 1.2
    elif spec.get("decays") == "saturated":  # 1e-9 and 1 - 1e-7 at random, as in test_scan.py
        near_one = torch.rand(a.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) < 0.5
        a = torch.where(near_one, 1 - 1e-7, 1e-9).to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    w = None if spec.get("sum_loss") else torch.randn(a.shape, generator=gen, dtype=torch.float64)
    cast = lambda x: None if x is None else x.to(device=device, dtype=spec["dtype"])  # noqa: E731
    return dict(inputs=tuple(cast(x) for x in (a, b, h0)), weight=cast(w), block_t=spec["block_t"],
                block_c=spec["block_c"], non_contiguous=spec.get("non_contiguous", False),
                gradcheck=spec in GRADCHECK_SPECS)


def _reference(case):
    """The loop in float64 on the very (rounded) inputs: the answer each result is held to."""
    if case.get("cell"):
        *parts, h0 = [None if x is None else x.cpu().double() for x in case["inputs"]]
        spec = get_cell(case["cell"])
        options = {"normalize": case["normalize"]} if "normalize" in spec.option_names else {}
        reset = case.get("reset")

        def fn(*args):
            if reset is not None:  # each document alone
                return per_document(spec, args[:-1], args[-1], spec.options(**options), None, reset.cpu())
            return MF.run_cell(spec, args[:-1], args[-1], mode="sequential", **options)[0]

        return run_with_grads(fn, (*parts, h0), case["weight"].cpu().double())
    inputs = [None if x is None else x.cpu().double() for x in case["inputs"]]
    w = torch.ones_like(inputs[0]) if case["weight"] is None else case["weight"].cpu().double()
    return run_with_grads(lambda *x: minrnn.scan(*x, backend="sequential"), inputs, w)


def _subprocess_env(**extra):
    """This environment, with this very minrnn (installed or not) first on the path."""
    src = str(Path(minrnn.__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])), **extra)


def _tol(dtype):
    return HALF_TOL.get(dtype, TOL.get(dtype))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every spec's result from the kernels under Triton's interpreter, by name."""
    specs = SPECS + GRADCHECK_SPECS + CELL_SPECS
    tmp = tmp_path_factory.mktemp("triton")
    torch.save([_case(s) for s in specs], tmp / "cases.pt")
    env = _subprocess_env(TRITON_INTERPRET="1")
    worker = Path(__file__).with_name("triton_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(tmp / "cases.pt"), str(tmp / "results.pt")],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"the interpreter worker failed:\n{proc.stdout}\n{proc.stderr}")
    return dict(zip((s["name"] for s in specs), torch.load(tmp / "results.pt")))


def _check(spec, got, case):
    ref = _reference(case)
    assert len(got) == len(ref)
    assert got[0].shape == (spec["B"], spec["T"], spec["C"])
    names = (["h"] + [f"grad {n}" for n in get_cell(spec["cell"]).pre_names] if spec.get("cell")
             else ["h", "grad a", "grad b"])
    for name, g, r in zip(names + ["grad h0"], got, ref):
        assert torch.isfinite(g).all(), f"{spec['name']} {name} not finite"
        assert_close_scaled(g, r, _tol(spec["dtype"]), f"{spec['name']} {name}")


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")
needs_cuda = pytest.mark.skipif(not BACKENDS["triton"].available(), reason="needs a CUDA GPU and triton")


@needs_triton
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["name"])
def test_interpreted_kernels_match_reference(interpreted, spec):
    _check(spec, interpreted[spec["name"]], _case(spec))


@needs_triton
@pytest.mark.parametrize("spec", CELL_SPECS, ids=lambda s: s["name"])
def test_interpreted_fused_cells_match_reference(interpreted, spec):
    _check(spec, interpreted[spec["name"]], _case(spec))


@needs_triton
@pytest.mark.parametrize("spec", GRADCHECK_SPECS, ids=lambda s: s["name"])
def test_interpreted_kernels_gradcheck(interpreted, spec):
    passed, message = interpreted[spec["name"]]
    assert passed, message


@needs_cuda
@pytest.mark.parametrize("spec", SPECS + GRADCHECK_SPECS + CELL_SPECS, ids=lambda s: s["name"])
def test_compiled_kernels_match_reference(spec):
    from .triton_worker import run_case

    case = _case(spec, device="cuda")
    got = run_case(case)
    if case["gradcheck"]:
        assert got[0], got[1]
    else:
        _check(spec, [g.cpu() for g in got], case)


@needs_cuda
def test_auto_picks_triton_on_cuda():
    a, b, h0 = make_scan_inputs(2, 300, 8, dtype=torch.float32)
    a, b, h0 = a.cuda(), b.cuda(), h0.cuda()
    assert minrnn.ops.resolve_backend("auto", a.device).name == "triton"
    assert_close_scaled(minrnn.scan(a, b, h0).cpu(), minrnn.scan(a.cpu(), b.cpu(), h0.cpu(), backend="sequential"),
                        TOL[torch.float32])


def test_registered_for_cuda_with_native_half_and_first_in_auto():
    be = BACKENDS["triton"]
    assert be.devices == frozenset({"cuda"}) and be.native_half and be.signed
    assert be.cell is not None and be.cell_names == {"mingru", "minlstm"}  # the fused cells
    assert be.runs_cell(get_cell("minlstm")) and not be.runs_cell(get_cell("mingru"), masked=True)
    assert be.runs_cell(get_cell("mingru"), resets=True)  # the kernels take document starts
    assert be.auto_rank < min(b.auto_rank for b in BACKENDS.values() if b.auto_rank is not None and b is not be)


def test_cpu_tensors_without_the_interpreter_are_refused_clearly():
    if not HAS_TRITON:
        pytest.skip("the triton package is not installed")
    from minrnn.ops import _triton_kernels, triton

    if _triton_kernels.INTERPRETED:
        pytest.skip("this process runs Triton's interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton.triton_scan(*make_scan_inputs(1, 4, 2, dtype=torch.float32))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kernel", ["scan_fwd", "scan_bwd", "cell_fwd", "cell_bwd"])
def test_kernels_compile_for_hopper_without_a_gpu(kernel, dtype):
    """The interpreter runs the kernels' Python; the compiler checks what it does not (types
    of loop-carried values, the pipelined loads) down to an sm_90 binary, and the shared
    memory that the default tiles need against the H100's 227 KB."""
    from minrnn.ops import _triton_kernels
    from minrnn.ops import triton as backend

    if _triton_kernels.INTERPRETED:
        pytest.skip("this process runs Triton's interpreter")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_t, block_c, num_warps = backend._config(torch.empty(16, 1, 1024, dtype=dtype), None, None, None)
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float64: "*fp64"}[dtype]
    kern = getattr(_triton_kernels, kernel)
    for has_h0, one in ((True, ()), (False, ("T",))):  # T == 1 is specialised to a constant
        meta = dict(HAS_H0=has_h0, ACC=backend._acc(dtype), BLOCK_T=block_t, BLOCK_C=block_c, **{n: 1 for n in one})
        if kernel.startswith("cell"):  # minLSTM with normalisation: the most registers and loads
            meta.update(N_PRE=3, CELL_LSTM=True, NORMALIZE=True, HAS_RESET=has_h0)
        sig = {n: "*u8" if n == "reset_ptr" else ptr if n.endswith("_ptr") else "constexpr" if n in meta else "i32"
               for n in kern.arg_names}
        compiled = triton.compile(ASTSource(kern, sig, meta), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=num_warps))
        assert compiled.asm["cubin"], "no binary"
        assert compiled.metadata.shared <= 227 * 1024, f"{compiled.metadata.shared} bytes of shared memory"
        if dtype == torch.float32 and not one:  # the next tiles' loads are in flight meanwhile
            assert "cp.async" in compiled.asm["ptx"]


def test_bad_tile_sizes_are_refused():
    from minrnn.ops.triton import triton_scan

    for kw in ({"block_t": 12}, {"block_c": 1}, {"block_t": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be a power of two"):
            triton_scan(*make_scan_inputs(1, 4, 2, dtype=torch.float32), **kw)


# Run in a fresh interpreter: this process may have imported triton already.
_WITHOUT_TRITON = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked for this test")
sys.meta_path.insert(0, Block())
import torch, minrnn
from minrnn.ops import triton as backend
assert not backend.available(), "available() without triton"
assert "triton" not in minrnn.available_backends()
x = torch.rand(1, 3, 2)
try:
    minrnn.scan(x, x, backend="triton")
except RuntimeError as e:
    assert "needs the triton package" in str(e), e
else:
    raise AssertionError("backend='triton' ran without triton")
print("ok")
"""


def test_minrnn_imports_and_reports_the_backend_unavailable_without_triton():
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, timeout=120,
                          env=_subprocess_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


_IMPORT_ONLY = """
import sys, torch, minrnn
imported = "triton" in sys.modules
minrnn.scan(torch.rand(1, 5, 2), torch.rand(1, 5, 2))  # auto on CPU tensors
print(imported, "triton" in sys.modules)
"""


def test_import_minrnn_does_not_import_triton():
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ONLY], capture_output=True, text=True, timeout=120,
                          env=_subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
