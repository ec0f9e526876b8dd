"""Seeds, batches and parameters over devices and processes (subspace_jax.sharding).

Forced host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) only take effect
in a fresh process, so everything that needs several devices runs in a subprocess; each
sharded result is compared with the same run on one device (float tolerance: the batch mean
becomes a cross-device reduction, vmap over 4 seeds batches the matmuls differently).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest

from subspace_jax import sharding
from subspace_jax.sharding import MeshSpec, check_mesh_spec, parse_mesh, resolve_layout

TINY = [
    "--quiet",
    "--model",
    "mlp_small",
    "--width",
    "8",
    "--epochs",
    "1",
    "--max-steps",
    "4",
    "--batch-size",
    "32",
    "--val-size",
    "200",
]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_python(code: str, devices: int, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(devices),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_cli(args, devices: int, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "subspace_jax", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(devices),
    )


def cli_json(tmp_path, name, args, devices):
    path = tmp_path / f"{name}.json"
    proc = run_cli([*args, "--json", path], devices)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(path.read_text())


def assert_same_seed(a: dict, b: dict, tol=1e-4):
    """One seed's numbers from two runs agree to float tolerance."""
    assert a["seed"] == b["seed"]
    for key in ("val_loss", "test_loss"):
        if key in a:
            assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), key
    for key in ("val_accuracy", "test_accuracy", "best_val_accuracy"):
        assert a[key] == pytest.approx(b[key], abs=0.006), key  # at most a prediction or two


def per_seed_with_losses(res: dict) -> list[dict]:
    last = res["history"][-1]
    return [
        {
            **s,
            "val_loss": last["per_seed_val_loss"][i],
            "train_loss": last["per_seed_train_loss"][i],
        }
        for i, s in enumerate(res["per_seed"])
    ]


# ------------------------------------------------------------------------------ pure rules


def test_parse_mesh_accepts_the_axes_in_any_order_and_rejects_the_rest():
    assert parse_mesh("seeds=2,data=4") == MeshSpec(2, 4, 1)
    assert parse_mesh("params=2, seeds=1,data=2") == MeshSpec(1, 2, 2)
    for bad in ("seeds=2,seeds=2", "gpus=2", "seeds=0", "seeds=x", "seeds", ""):
        with pytest.raises(ValueError, match="mesh"):
            parse_mesh(bad)


@pytest.mark.parametrize(
    "devices, spec, seeds, want",
    [
        (4, MeshSpec(), 4, (4, 1, 1)),  # the done-when layout: one seed a device
        (4, MeshSpec(), 3, (1, 4, 1)),  # gcd(3, 4) = 1: data parallel
        (8, MeshSpec(), 6, (2, 4, 1)),
        (8, MeshSpec(params=2), 4, (4, 1, 2)),
        (8, MeshSpec(seeds=2, data=2, params=2), 4, (2, 2, 2)),
        (8, MeshSpec(seeds=4, data=2), 2, (2, 4, 1)),  # a round with fewer seeds: S shrinks
        (4, MeshSpec(data=4), 4, (1, 4, 1)),
    ],
)
def test_resolve_layout(devices, spec, seeds, want):
    got = resolve_layout(devices, spec, seeds)
    assert got == want and np.prod(got) == devices


@pytest.mark.parametrize(
    "spec, match",
    [
        (MeshSpec(seeds=2, data=4), "product must equal"),
        (MeshSpec(seeds=3, data=1), "does not divide|product"),
        (MeshSpec(params=3), "does not divide"),
        (MeshSpec(seeds=4, data=1), "divide the number of seeds"),
        (MeshSpec(seeds=1, data=4), None),
        (MeshSpec(seeds=2, data=2), "divide the batch size"),
    ],
)
def test_check_mesh_spec(spec, match):
    # 4 devices, 2 seeds, batch size 2 (data=2 then divides it; see the last case's 3).
    batch = 3 if match == "divide the batch size" else 4
    if match is None:
        check_mesh_spec(spec, 4, 2, batch)
        return
    with pytest.raises(ValueError, match=match):
        check_mesh_spec(spec, 4, 2, batch)


#: One registered projection of each state type that has a splitter.
SPLIT_TYPES = [
    "dense",
    pytest.param("fastfood", marks=pytest.mark.slow),
    pytest.param("orthogonal_hadamard", marks=pytest.mark.slow),
    pytest.param("sparse_very", marks=pytest.mark.slow),
    "sparse_very_coo",
    "sparse_very_csc",
]


@pytest.mark.parametrize("name", SPLIT_TYPES)
def test_split_state_pads_without_changing_the_first_D_outputs(name):
    """Padding for a parameter axis of 3 (D = 610 is not a multiple) changes no output of
    ``apply`` (first D entries) or ``transpose`` (with the cotangent zero-padded)."""
    import jax
    import jax.numpy as jnp

    from subspace_jax.projections import get_projection

    D, d = 610, 20
    w = jnp.asarray(np.random.default_rng(0).normal(size=d), jnp.float32)
    g = jnp.asarray(np.random.default_rng(1).normal(size=D), jnp.float32)
    proj = get_projection(name)
    state = proj.init(jax.random.key(3), D, d)
    padded, axes = sharding.split_state(state, 3)
    assert any(a is not None for a in axes)
    out = proj.apply(padded, w)
    assert out.shape[0] >= D
    np.testing.assert_allclose(out[:D], proj.apply(state, w), rtol=1e-5, atol=1e-6)
    g_pad = jnp.pad(g, (0, out.shape[0] - D))
    np.testing.assert_allclose(
        proj.transpose(padded, g_pad), proj.transpose(state, g), rtol=1e-5, atol=1e-5
    )


# ------------------------------------------------------------------------------ library step

LIBRARY_STEP = """
import json, sys, jax, jax.numpy as jnp, numpy as np, optax
from subspace_jax import sharding as sh
from subspace_jax._subspace import init_trainable, make_layout
from subspace_jax.models import build_model
from subspace_jax.projections import projection_names
from subspace_jax.train import make_train_step
from subspace_jax.train._loop import make_init_fn, run_keys

assert jax.device_count() == 8
model = build_model("mlp_small", (8, 8, 1), 10, width=8)  # D = 610: 4 and 8 do not divide it
shapes = jax.eval_shape(model.init, jax.random.key(0))
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
y = rng.integers(0, 10, 16).astype(np.int32)
opt = optax.adam(0.05)
compiles = []


def on_event(name, *args, **kwargs):
    if name.endswith("backend_compile_duration"):
        compiles.append(name)


jax.monitoring.register_event_duration_secs_listener(on_event)
layouts = {"4dev": (4, 1, 2, 2), "8dev": (8, 2, 2, 2)}  # (devices, seeds, data, params)
out = {}
for name in projection_names():
    layout = make_layout(shapes, 20, projection=name)
    subs = make_init_fn(model, layout)(run_keys([0, 1, 2, 3]))

    def run(mesh):
        t = jax.tree.map(jnp.copy, jax.vmap(init_trainable)(subs))
        o = jax.vmap(opt.init)(t)
        mesh = mesh or sh.make_mesh(jax.devices()[:1], num_seeds=4)
        step = sh.sharded_train_step(make_train_step(model.apply, opt), mesh)
        placed, t, o = sh.place_state(mesh, subs, t, o)
        before = len(compiles)
        for i in range(3):
            t, o, loss, acc = step(placed, t, o, x, y)
        return np.asarray(t.w).tolist(), np.asarray(loss).tolist(), len(compiles) - before

    ref = run(None)
    res = {"ref": ref}
    for key, (n, s, b, p) in layouts.items():
        mesh = sh.make_mesh(jax.devices()[:n], sh.MeshSpec(s, b, p), num_seeds=4)
        res[key] = run(mesh)
        placed = sh.shard_subspace(mesh, subs)
        specs = [str(leaf.sharding.spec) for leaf in jax.tree.leaves(placed.proj_states)]
        res[key + "_split"] = any("params" in sp for sp in specs)
    out[name] = res
    print(name, flush=True, file=sys.stderr)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_step_matches_one_device_for_every_projection_on_4_and_8_devices():
    """Every registered projection, seeds x batch x params meshes over 4 and 8 devices,
    D = 610 (not a multiple of 4 or 8): the sharded step gives the single-device trainable
    and loss, compiles once (3 steps, one compilation), and the states are really split."""
    from subspace_jax.projections import projection_names

    proc = run_python(LIBRARY_STEP, devices=8, timeout=1800)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(out) == sorted(projection_names())
    for name, res in out.items():
        w_ref, loss_ref, _ = res["ref"]
        for key in ("4dev", "8dev"):
            w, loss, compiles = res[key]
            np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=2e-5, err_msg=f"{name} {key}")
            np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, err_msg=f"{name} {key}")
            assert compiles == 1, (name, key, compiles)
    split = {name for name, res in out.items() if res["8dev_split"]}
    assert {"dense", "orthogonal", "fastfood", "orthogonal_hadamard", "sparse_very"} <= split


# ------------------------------------------------------------------------------ the CLI


@pytest.mark.slow
def test_done_when_four_seeds_on_four_devices_equal_four_single_seed_runs(tmp_path):
    """The issue's check: ``train --seeds 0,1,2,3 --dim 300 --projection fastfood`` on 4
    forced devices (digits, the default dataset; the default mlp, one short epoch) trains one
    seed a device, and each seed equals its own single-seed, single-device run."""
    args = ["train", "--quiet", "--dim", "300", "--projection", "fastfood"]
    args += ["--epochs", "1", "--max-steps", "4", "--batch-size", "32", "--val-size", "200"]
    four = cli_json(tmp_path, "four", [*args, "--seeds", "0,1,2,3"], devices=4)
    assert four["devices"] == 4 and four["processes"] == 1
    assert four["mesh"] == {"seeds": 4, "data": 1, "params": 1}
    singles = []
    for seed in range(4):
        one = cli_json(tmp_path, f"s{seed}", [*args, "--seeds", seed], devices=1)
        assert one["devices"] == 1 and one["mesh"] == {"seeds": 1, "data": 1, "params": 1}
        singles += per_seed_with_losses(one)
    for a, b in zip(per_seed_with_losses(four), singles, strict=True):
        assert_same_seed(a, b)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


COMPILED = """
import json, logging, re, sys, jax
from subspace_jax import cli

names = []


class Compiles(logging.Handler):
    def emit(self, record):
        found = re.match(r"Compiling (\\S+) with global shapes", record.getMessage())
        if found:
            names.append(found.group(1))


jax.config.update("jax_log_compiles", True)
logging.getLogger("jax").addHandler(Compiles())
assert cli.main(sys.argv[1:]) == 0
print(json.dumps(names))
"""


def compiled(args, devices) -> list[str]:
    """The functions ``subspace-jax ARGS`` compiles, one name per compilation."""
    proc = subprocess.run(
        [sys.executable, "-c", COMPILED, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(devices),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_on_8_devices_with_a_params_axis_matches_one_device_and_compiles_as_often(tmp_path):
    """``--mesh seeds=2,data=2,params=2`` over 8 forced devices (D = 6,370 of mlp_small
    width 8 is padded for the params axis) gives each seed's single-device numbers, and
    compiles exactly as often as the single-device run (no recompilation per step)."""
    args = ["train", *TINY, "--seeds", "0,1", "--dim", "20", "--projection", "dense"]
    mesh = cli_json(tmp_path, "mesh", [*args, "--mesh", "seeds=2,data=2,params=2"], devices=8)
    one = cli_json(tmp_path, "one", [*args, "--devices", "1"], devices=8)
    assert mesh["devices"] == 8 and mesh["mesh"] == {"seeds": 2, "data": 2, "params": 2}
    assert one["devices"] == 1
    for a, b in zip(per_seed_with_losses(mesh), per_seed_with_losses(one), strict=True):
        assert_same_seed(a, b)
    sharded = compiled([*args, "--mesh", "seeds=2,data=2,params=2"], devices=8)
    single = compiled([*args, "--devices", "1"], devices=8)
    # Placing the state slices it onto the devices (jit(_multi_slice), once per leaf); every
    # other compilation is one the single-device run makes too: the step compiles once.
    assert Counter(n for n in sharded if n != "jit(_multi_slice)") == Counter(single)


@pytest.mark.slow
def test_sweep_and_id_spread_seeds_over_4_devices_with_one_device_results(tmp_path):
    base = [*TINY, "--seeds", "0,1,2,3", "--projection", "fastfood"]
    sweep = [*base, "--dims", "8,32"]
    many = cli_json(tmp_path, "sw4", ["sweep", *sweep, "--out", tmp_path / "s4"], devices=4)
    one = cli_json(
        tmp_path, "sw1", ["sweep", *sweep, "--out", tmp_path / "s1", "--devices", "1"], devices=4
    )
    assert many["devices"] == 4 and many["mesh"] == {"seeds": 4, "data": 1, "params": 1}
    assert one["devices"] == 1
    for a, b in zip(many["runs"], one["runs"], strict=True):
        assert (a["dim"], a["seed"]) == (b["dim"], b["seed"])
        assert_same_seed(a, b)
    ident = ["id", *base, "--d-start", "16", "--d-max", "32", "--bootstrap", "0"]
    many = cli_json(tmp_path, "id4", [*ident, "--out", tmp_path / "i4"], devices=4)
    one = cli_json(tmp_path, "id1", [*ident, "--out", tmp_path / "i1", "--devices", "1"], devices=4)
    assert many["devices"] == 4 and many["processes"] == 1
    assert json.loads((tmp_path / "i4" / "id.json").read_text())["devices"] == 4
    for a, b in zip(many["runs"], one["runs"], strict=True):
        assert_same_seed(a, b)


BENCH_STEPS = """
import json
import jax
import numpy as np
from subspace_jax.bench._worker import _Worker

spec = {"model": "mlp_small", "dataset": "mnist", "input_shape": [28, 28, 1], "batch_size": 64,
        "steps": 1, "warmup": 1, "seed": 0, "model_overrides": {"width": 8}}
out = {}
for devices, mesh in ((1, {}), (4, {}), (4, {"params": 2})):
    worker = _Worker({**spec, "devices": devices, "mesh": mesh})
    got = {"fields": worker.device_fields()}
    for name in ("fastfood", "dense"):  # the sharded projection steps run and are timed
        rec = worker.cell(name, 30)
        assert rec["step_time_ms"] > 0 and rec["mesh"] == got["fields"]["mesh"], rec
    worker.direct.run(worker.x, worker.y, 3)  # as many direct steps on every mesh
    leaves = jax.tree_util.tree_leaves(jax.device_get(worker.direct.trainable))
    got["direct"] = [np.asarray(x).reshape(-1).tolist() for x in leaves]
    out[f"{devices}-{mesh}"] = got
print(json.dumps(out))
"""


@pytest.mark.slow
def test_bench_times_one_seeds_step_sharded_over_the_devices(tmp_path):
    """``bench`` on 4 forced devices: the batch split 4 ways (or 2 x params 2), the records
    say so, and the sharded direct step trains to the one-device numbers."""
    proc = run_python(BENCH_STEPS, devices=4)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["1-{}"]["fields"] == {"devices": 1, "mesh": {"seeds": 1, "data": 1, "params": 1}}
    assert out["4-{}"]["fields"] == {"devices": 4, "mesh": {"seeds": 1, "data": 4, "params": 1}}
    assert out["4-{'params': 2}"]["fields"]["mesh"] == {"seeds": 1, "data": 2, "params": 2}
    one = out["1-{}"]["direct"]
    for key in ("4-{}", "4-{'params': 2}"):
        for a, b in zip(out[key]["direct"], one, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    bench = ["bench", "--quiet", "--model", "mlp_small", "--width", "8", "--dims", "30"]
    bench += ["--projections", "fastfood", "--steps", "2", "--warmup", "1", "--batch-size", "64"]
    for flags, want in (([], 4), (["--devices", "2"], 2)):
        path = tmp_path / f"bench{want}.json"
        proc = run_cli([*bench, *flags, "--json", path], devices=4)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (rec,) = json.loads(path.read_text())
        assert rec["devices"] == want and rec["mesh"]["data"] == want, rec
        assert rec["step_time_ms"] > 0
    proc = run_cli([*bench, "--mesh", "seeds=2,data=2"], devices=4)
    assert proc.returncode == 2 and "divide the number of seeds (1)" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, match",
    [
        (["--mesh", "seeds=2,data=4"], "product must equal"),
        (["--mesh", "seeds=4,data=1"], "divide the number of seeds"),
        (["--mesh", "chips=4"], "--mesh takes"),
        (["--devices", "9"], "--devices must be in 1..4"),
        (["--coordinator", "127.0.0.1:1"], "needs --num-processes"),
    ],
)
def test_bad_device_flags_are_one_line_errors(flags, match):
    proc = run_cli(["train", *TINY, "--seeds", "0,1", "--dim", "5", *flags], devices=4)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0]


# ------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(args, tmp_path, name):
    """``args`` on 2 processes x 2 forced CPU devices over 127.0.0.1 (gloo); process 0's JSON."""
    port = _free_port()
    procs = []
    for pid in range(2):
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", pid]
        cmd = [sys.executable, "-m", "subspace_jax", *map(str, args), *map(str, flags)]
        cmd += ["--json", str(tmp_path / f"{name}{pid}.json")]
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(2)
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert not (tmp_path / f"{name}1.json").exists()  # process 0 alone writes results
    return json.loads((tmp_path / f"{name}0.json").read_text())


@pytest.mark.slow
def test_two_processes_give_the_one_process_result_for_train_and_sweep(tmp_path):
    train = ["train", *TINY, "--seeds", "0,1", "--dim", "20", "--projection", "fastfood"]
    # The same command on every process: process 0 alone writes the model files.
    saves = ["--save-compressed", tmp_path / "two.npz", "--save-params", tmp_path / "two_p.npz"]
    two = run_two_processes([*train, *saves], tmp_path, "train")
    saves = ["--save-compressed", tmp_path / "one.npz", "--save-params", tmp_path / "one_p.npz"]
    one = cli_json(tmp_path, "train_one", [*train, "--devices", "1", *saves], devices=1)
    assert two["devices"] == 4 and two["processes"] == 2
    assert two["mesh"] == {"seeds": 2, "data": 2, "params": 1}
    for a, b in zip(per_seed_with_losses(two), per_seed_with_losses(one), strict=True):
        assert_same_seed(a, b)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == [
        "one.npz", "one_p.npz", "two.npz", "two_p.npz"
    ]  # fmt: skip
    # The gathered model: the compressed file scores seed 0's test numbers, the full
    # parameters equal the one-process run's.
    evaluate = ["evaluate", "--compressed", tmp_path / "two.npz"]
    evaluated = cli_json(tmp_path, "eval_two", evaluate, devices=1)
    assert evaluated["test_loss"] == pytest.approx(two["per_seed"][0]["test_loss"], rel=1e-5)
    with np.load(tmp_path / "two_p.npz") as a, np.load(tmp_path / "one_p.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5)
    sweep = ["sweep", *TINY, "--seeds", "0,1", "--dims", "8", "--projection", "fastfood"]
    two = run_two_processes([*sweep, "--out", tmp_path / "sw2"], tmp_path, "sweep")
    one = cli_json(tmp_path, "sweep_one", [*sweep, "--out", tmp_path / "sw1"], devices=1)
    assert two["processes"] == 2
    assert len((tmp_path / "sw2" / "runs.jsonl").read_text().splitlines()) == 4
    for a, b in zip(two["runs"], one["runs"], strict=True):
        assert_same_seed(a, b)
