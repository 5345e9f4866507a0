"""Bad input in one table: each case runs the CLI's own code (Hydra's main, the load process's body, the exit
status and the message it prints), and the checkpoint it pointed at is byte-identical afterwards.

The fast test runs the load process's body in this process (its `multiprocessing` hops replaced by a call);
the slow one runs every case that needs no patching through `python -m pipeline` itself.
"""

from __future__ import annotations

import json
import runpy
import shutil
import signal
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pipeline
from pipeline import isolate
from pipeline.core.schema import SETUP, STAGE_KINDS
from pipeline.runner import StageError
from tests.helpers import ARCH, SYN, assert_same_weights, entry, file_digests, run_cli, to_pickle

COMPOSE = None  # refused while Hydra composes the config: no stage ran, no run.json
CONFIG = SETUP  # refused by the runner's setup (the schemas' cross-field checks, the stage builder): no stage ran


@dataclass
class Case:
    id: str
    args: list[str]  # CLI overrides (CKPT: the broken copy's folder); every case gets model.path=<the copy>
    stage: str | None  # the failed_stage run.json names
    message: str  # a piece of the message on stderr
    breaks: Callable[[Path], None] | None = None  # breaks the copy before the run
    base: str = "plain"  # plain: a tiny fp16 checkpoint; nf4: the same model saved quantized; pickle: as .bin
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # in-process only (e.g. a backend missing)


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def edit_json(name: str, change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def breaks(path: Path) -> None:
        data = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps(change(data)))

    return breaks


def rewrite_tensor(change: Callable[[str, torch.Tensor], torch.Tensor | None], shard: int = 0):
    """Rewrite one shard with `change` applied to each tensor (None drops it); the index follows."""

    def breaks(path: Path) -> None:
        file = shards(path)[shard]
        tensors = {k: change(k, t) for k, t in load_file(file).items()}
        kept = {k: t for k, t in tensors.items() if t is not None}
        save_file(kept, file, metadata={"format": "pt"})
        index = path / "model.safetensors.index.json"
        if index.exists():
            edit_json(
                index.name,
                lambda d: d | {"weight_map": {k: v for k, v in d["weight_map"].items() if v != file.name or k in kept}},
            )(path)

    return breaks


def write_bytes(change: Callable[[bytes], bytes], shard: int = 0) -> Callable[[Path], None]:
    def breaks(path: Path) -> None:
        file = shards(path)[shard]
        file.write_bytes(change(file.read_bytes()))

    return breaks


def drop_last_shard(path: Path) -> None:
    """The last shard and its index entries gone: the model lacks those weights."""
    last = shards(path)[-1]
    edit_json(
        "model.safetensors.index.json",
        lambda d: d | {"weight_map": {k: v for k, v in d["weight_map"].items() if v != last.name}},
    )(path)
    last.unlink()


def with_tokenizer_and_text(text: str) -> Callable[[Path], None]:
    """A word-level tokenizer saved beside the weights (so the verify stage reads text) and a text file."""

    def breaks(path: Path) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        words = {w: i for i, w in enumerate(["[UNK]", "once", "upon", "a", "time"])}
        tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
        (path / "eval.txt").write_text(text)

    return breaks


def no_bitsandbytes(mp: pytest.MonkeyPatch) -> None:
    from transformers.quantizers import quantizer_bnb_4bit

    mp.setattr(quantizer_bnb_4bit, "is_bitsandbytes_available", lambda: False)


def bitsandbytes_for_cuda_only(mp: pytest.MonkeyPatch) -> None:
    import bitsandbytes

    mp.setattr(bitsandbytes, "supported_torch_devices", {"cuda"}, raising=False)


def no_hqq(mp: pytest.MonkeyPatch) -> None:
    from importlib.metadata import PackageNotFoundError

    from stages.backends import base

    real = base.version

    def version(name: str) -> str:
        if name == "hqq":
            raise PackageNotFoundError(name)
        return real(name)

    mp.setattr(base, "version", version)


LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128}
REMOTE = {"model_type": "x_custom", "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}


NO_ABSMAX = rewrite_tensor(lambda k, t: None if k.endswith("q_proj.weight.absmax") else t)

CASES = [
    # config and environment
    Case("quant-type", ["quant.bnb_4bit_quant_type=nf5"], COMPOSE, "Invalid value 'nf5', expected one of [nf4, fp4]"),
    Case(
        "quant-option",
        ["quant=nf5"],
        COMPOSE,
        "quant=nf5: not a quant option; valid: fp4, fp4_double, int8, nf4, nf4_double, none, or <backend>/<scheme> "
        "with a backend of bnb, hqq, quanto, torchao",
    ),
    Case("dtype", ["dtype.name=fp8"], COMPOSE, "expected one of [fp16, bf16, fp32, auto]"),
    Case("policy", ["device_map.policy=everywhere"], COMPOSE, "expected one of [auto, balanced, balanced_low_0"),
    Case("unknown-key", ["model.sourec=synthetic"], COMPOSE, "Key 'sourec' not in 'ModelConfig'"),
    Case("4bit-and-8bit", ["quant.load_in_8bit=true"], COMPOSE, "Key 'load_in_8bit' not in 'BnbQuantConfig'"),
    Case(
        "double-quant-int8",
        ["quant=int8", "quant.bnb_4bit_use_double_quant=true"],
        CONFIG,
        "quant.bnb_4bit_use_double_quant=true contradicts quant.method=bnb_8bit",
    ),
    Case(
        "malformed-size",
        ["device_map.max_memory={cpu: 80GiBs}"],
        CONFIG,
        "device_map.max_memory.cpu='80GiBs' is not a size",
    ),
    Case(
        "absent-gpu",
        ["device_map.max_memory={7: 24GiB, cpu: 64GiB}"],
        "env_check",
        "device_map names GPU 7, but this machine has",
    ),
    Case("over-budget", ["quant=none", "device_map.max_memory={cpu: 100KB}"], "device_map", "does not fit"),
    Case(
        "4bit-offload",
        ["device_map=explicit", "device_map.map={model: cpu, lm_head: disk}"],
        "env_check",
        "quant.llm_int8_enable_fp32_cpu_offload=true",
    ),
    Case("backend-missing", [], "env_check", "quant=nf4 needs bitsandbytes", patch=no_bitsandbytes),
    Case(
        "backend-package-missing",
        ["quant=hqq/b4_g64"],
        "env_check",
        "needs the hqq backend's package(s): hqq not installed. Fix: pip install 'hqq>=0.2.8'",
        patch=no_hqq,
    ),
    Case(
        "backend-scheme-not-here",
        ["quant=torchao/int4_weight_only"],
        "env_check",
        "cannot run here: torchao's Int4WeightOnlyConfig packs int4 weights for CUDA or XPU kernels only",
    ),
    Case("backend-unknown", ["quant.backend=gguf"], COMPOSE, "expected one of [none, bnb, torchao, quanto, hqq]"),
    Case(
        "backend-scheme-unknown",
        ["quant=torchao/int3"],
        COMPOSE,
        "quant=torchao/int3: 'int3' is not a scheme of the torchao backend; valid: torchao/float8_weight_only, "
        "torchao/int4_weight_only, torchao/int8_dynamic, torchao/int8_weight_only",
    ),
    Case(
        "backend-scheme-unknown-hqq",
        ["quant=hqq/b5"],
        COMPOSE,
        "'b5' is not a scheme of the hqq backend; valid: hqq/b1_g8, hqq/b2_g16, hqq/b3_g64, hqq/b4_g128, hqq/b4_g64",
    ),
    Case(
        "backend-unknown-in-option",
        ["quant=gguf/q4_k"],
        COMPOSE,
        "quant=gguf/q4_k: 'gguf' is not a quantization backend; valid backends: bnb, hqq, quanto, torchao",
    ),
    Case(
        "backend-key-unknown", ["quant=quanto/int4", "quant.nbits=4"], COMPOSE, "Key 'nbits' not in 'QuantoQuantConfig'"
    ),
    Case("hqq-nbits", ["quant=hqq/b4_g64", "quant.nbits=5"], CONFIG, "quant.nbits=5: HQQ takes one of 1, 2, 3, 4, 8"),
    Case("backend-device", [], "env_check", "a backend for a device here (cpu)", patch=bitsandbytes_for_cuda_only),
    # security
    Case(
        "target-os-system",
        ["stages.stream._target_=os.system"],
        CONFIG,
        "stages.stream._target_='os.system': a config may only select one of this project's stream stages",
    ),
    Case(
        "target-eval",
        ["stages.verify._target_=builtins.eval"],
        CONFIG,
        "may only select one of this project's verify stages",
    ),
    Case(
        "remote-code",
        [],
        "config_merge",
        "runs only with model.trust_remote_code=true",
        breaks=edit_json("config.json", lambda d: d | REMOTE),
    ),
    Case("verify-text-missing", ["stages/verify=logits", "stages.verify.text=CKPT/none.txt"], CONFIG, "no such file"),
    Case(
        "verify-text-too-short",
        ["stages/verify=logits", "stages.verify.text=CKPT/eval.txt"],
        "verify",
        "1 token(s); need at least 2",
        breaks=with_tokenizer_and_text("once"),
    ),
    # checkpoints
    Case("no-config", [], "config_merge", "no config.json there", breaks=lambda p: (p / "config.json").unlink()),
    Case(
        "unknown-arch",
        [],
        "config_merge",
        "model_type='brand_new_arch' is not an architecture",
        breaks=edit_json("config.json", lambda d: d | {"model_type": "brand_new_arch"}),
    ),
    Case(
        "not-a-causal-lm",
        [],
        "preprocess",
        "model_type='vit' has no causal-LM class",
        breaks=edit_json("config.json", lambda d: d | {"model_type": "vit"}),
    ),
    Case(
        "lfs-pointer",
        [],
        "config_merge",
        "a Git LFS pointer, not weights; run `git lfs pull`",
        breaks=write_bytes(lambda b: LFS, shard=1),
    ),
    Case("truncated", [], "config_merge", "truncated: the header needs", breaks=write_bytes(lambda b: b[:-100])),
    Case(
        "corrupt-header",
        [],
        "config_merge",
        "corrupt safetensors header",
        breaks=write_bytes(lambda b: struct.pack("<Q", 9) + b"{not json"),
    ),
    Case(
        "header-too-long",
        [],
        "config_merge",
        "header length 1000000000000 does not fit",
        breaks=write_bytes(lambda b: struct.pack("<Q", 10**12) + b"{}"),
    ),
    Case("trailing-bytes", [], "config_merge", "16 trailing bytes", breaks=write_bytes(lambda b: b + b"\0" * 16)),
    Case(
        "pickle-weights",
        [],
        "config_merge",
        "unpickling a file can run arbitrary code hidden in it.\n  Fix: model.allow_pickle=true",
        base="pickle",
    ),
    Case(
        "index-missing-shard",
        [],
        "config_merge",
        "names shard(s) that are not in the folder",
        breaks=lambda p: shards(p)[-1].unlink(),
    ),
    Case(
        "unlisted-tensor",
        [],
        "config_merge",
        "holds 1 tensor(s) the index does not list here",
        breaks=edit_json(
            "model.safetensors.index.json", lambda d: d | {"weight_map": dict(list(d["weight_map"].items())[1:])}
        ),
    ),
    Case(
        "wrong-shape",
        ["quant=none"],
        "stream",
        "the model built from config.json expects",
        breaks=edit_json("config.json", lambda d: d | {"intermediate_size": 192}),
    ),
    Case(
        "wrong-shape-transformers",
        ["quant=none", "stages/stream=transformers"],
        "postprocess",
        "tensor(s) do not fit the model built from config.json",
        breaks=edit_json("config.json", lambda d: d | {"intermediate_size": 192}),
    ),
    Case(
        "wrong-dtype",
        [],
        "stream",
        "torch.int32, the model built from config.json expects",
        breaks=rewrite_tensor(lambda k, t: t.to(torch.int32) if "proj" in k else t),
    ),
    Case(
        "missing-keys",
        [],
        "postprocess",
        "refusing to leave them randomly initialized",
        breaks=drop_last_shard,
    ),
    Case(
        "unexpected-keys",
        [],
        "postprocess",
        "have no place in the model built from config.json",
        breaks=edit_json("config.json", lambda d: d | {"num_hidden_layers": 1}),
    ),
    Case(
        "prequantized-gptq",
        ["quant=nf4"],
        "config_merge",
        "already quantized with gptq",
        breaks=edit_json("config.json", lambda d: d | {"quantization_config": GPTQ}),
    ),
    Case(
        "prequantized-other-backend",
        ["quant=hqq/b4_g64"],
        "config_merge",
        "already quantized with bitsandbytes (quantization_config.quant_method), and quant=hqq-b4_g64 asks for hqq",
        base="nf4",
    ),
    Case(
        "prequantized-gptq-as-saved",
        ["quant=none"],
        "quantizer",
        "pre-quantized with gptq, which none of our backends",
        breaks=edit_json("config.json", lambda d: d | {"quantization_config": GPTQ}),
    ),
    Case(
        "unknown-quant-method",
        ["quant=none"],
        "config_merge",
        "quant_method='foo' is not a quantization method",
        breaks=edit_json("config.json", lambda d: d | {"quantization_config": {"quant_method": "foo"}}),
    ),
    Case(
        "missing-quant-state",
        ["quant=none"],
        "stream",
        "lack their quantization state",
        base="nf4",
        breaks=NO_ABSMAX,
    ),
    Case(
        "missing-quant-state-transformers",
        ["quant=none", "stages/stream=transformers"],
        "stream",
        "lack their quantization state",
        base="nf4",
        breaks=NO_ABSMAX,
    ),
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """The checkpoints the cases break copies of: tiny fp16 (several shards), the same saved in nf4, and as a
    single pickle file."""
    from pipeline import compose
    from pipeline.checkpoints import synthetic
    from pipeline.runner import run

    root = tmp_path_factory.mktemp("bases")
    plain = synthetic.materialize("t", ARCH, SYN, root / "cache")
    model, _ = run(compose([f"model.path={plain}", "quant=nf4", "stages.stream.progress=false"]), root / "run")
    model.save_pretrained(root / "nf4")
    return {"plain": plain, "nf4": root / "nf4", "pickle": to_pickle(plain, root / "pickle", sharded=False)}


def broken_copy(case: Case, bases: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(bases[case.base], path)
    if case.breaks:
        case.breaks(path)
    return path


class InProcess:
    """`multiprocessing`'s Process, run to its end in this process when started: the load process's body,
    its records and exit status, without a fresh interpreter."""

    def __init__(self, target: Callable, args: tuple = (), name: str | None = None) -> None:
        self.target, self.args, self.exitcode = target, args, None

    def start(self) -> None:
        sigint = signal.getsignal(signal.SIGINT)  # the go-between ignores Ctrl-C; not in pytest's process
        try:
            self.target(*self.args)
            self.exitcode = 0
        except SystemExit as done:
            self.exitcode = done.code if isinstance(done.code, int) else 1
        finally:
            signal.signal(signal.SIGINT, sigint)

    def join(self, timeout: float | None = None) -> None:
        pass


def cli_in_process(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    """`python -m pipeline ARGS` run in this process: pipeline/__main__.py as a script (its guard composes and
    checks the command line before Hydra acts, then Hydra's main), the load process's body called in line."""
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setattr(isolate._SPAWN, "Process", InProcess)
    # Hydra's logging setup is left out, so that it does not stay on in pytest's process
    logging = ["hydra/job_logging=none", "hydra/hydra_logging=none"]
    monkeypatch.setattr(sys, "argv", ["pipeline", *logging, *args])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(Path(pipeline.__file__).parent / "__main__.py"), run_name="__main__")
    out = capsys.readouterr()
    return done.value.code, out.out + out.err


def check_record(case: Case, run_dir: Path) -> None:
    if case.stage is COMPOSE:
        assert not (run_dir / "run.json").exists()
        return
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and record["failed_stage"] == case.stage
    assert case.message in record["error"]
    jsonl = run_dir / "stages.jsonl"
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    finished = [s["stage"] for s in lines if s["status"] == "ok"]
    assert finished == ([SETUP, *STAGE_KINDS[: STAGE_KINDS.index(case.stage)]] if case.stage != CONFIG else [])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_its_message_and_status_and_changes_nothing(
    case, bases, tmp_path, cache_dir, monkeypatch, capsys
):
    ckpt = broken_copy(case, bases, tmp_path)
    before = file_digests(ckpt)
    if case.patch:
        case.patch(monkeypatch)
    run_dir = tmp_path / "run"
    args = [
        f"hydra.run.dir={run_dir}",
        f"cache_dir={cache_dir}",
        "stages.stream.progress=false",
        f"model.path={ckpt}",
        *(a.replace("CKPT", str(ckpt)) for a in case.args),
    ]
    status, out = cli_in_process(monkeypatch, capsys, args)
    assert status == isolate.EXIT_LOAD_FAILED, out
    assert case.message in out
    if case.stage not in (COMPOSE, CONFIG):
        assert f"error: stage {case.stage} failed: " in out
    if case.id in REFUSED_BEFORE_HYDRA:  # the CLI's guard refuses the command line before Hydra makes a folder
        assert not run_dir.exists()
    else:
        check_record(case, run_dir)
    assert file_digests(ckpt) == before


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if not c.patch], ids=[c.id for c in CASES if not c.patch])
def test_bad_input_through_the_real_cli(case, bases, tmp_path, cache_dir):
    ckpt = broken_copy(case, bases, tmp_path)
    before = file_digests(ckpt)
    run_dir = tmp_path / "run"
    proc = run_cli(
        f"hydra.run.dir={run_dir}",
        f"cache_dir={cache_dir}",
        "stages.stream.progress=false",
        f"model.path={ckpt}",
        *(a.replace("CKPT", str(ckpt)) for a in case.args),
    )
    assert proc.returncode == isolate.EXIT_LOAD_FAILED, proc.stdout + proc.stderr
    assert case.message in proc.stderr
    if case.id in REFUSED_BEFORE_HYDRA:  # the CLI's guard refuses the command line before Hydra makes a folder
        assert not run_dir.exists()
    else:
        check_record(case, run_dir)
    assert file_digests(ckpt) == before


# configs naming code: `python -m pipeline` refuses them before Hydra runs (pipeline/guard.py's check_argv)
REFUSED_BEFORE_HYDRA = {"target-os-system", "target-eval"}


@pytest.mark.parametrize("stream", ["bounded", "transformers"])
def test_the_pickle_case_loads_with_its_fix_into_the_weights_of_the_safetensors(stream, bases, tmp_path, load):
    """The table's pickle-weights case is refused by default; the fix its message names, model.allow_pickle=true,
    really loads the .bin, into the same bytes as the safetensors it was converted from."""
    case = next(c for c in CASES if c.id == "pickle-weights")
    ckpt = broken_copy(case, bases, tmp_path)
    before = file_digests(ckpt)
    args = [f"model.path={ckpt}", f"stages/stream={stream}"]
    with pytest.raises(StageError) as refused:
        load(*args)
    assert refused.value.stage == case.stage and case.message in str(refused.value)
    model, record, _ = load(*args, "model.allow_pickle=true")
    assert record["status"] == "ok" and record["checkpoint"]["format"] == "pickle"
    assert record["checkpoint"]["shards"] == ["pytorch_model.bin"]
    reference, *_ = load(f"model.path={bases['plain']}", f"stages/stream={stream}")
    assert model.is_loaded_in_4bit  # the default quant=nf4, quantized from the unpickled tensors
    assert_same_weights(reference, model)
    assert file_digests(ckpt) == before


# The code a repo ships for the remote-code case: a Llama under another name that leaves a mark when it runs.
MODELING_X = """
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM


class XConfig(LlamaConfig):
    model_type = "x_custom"


class XForCausalLM(LlamaForCausalLM):
    config_class = XConfig

    def __init__(self, config):
        Path(config.x_marker).touch()
        super().__init__(config)
"""


def test_remote_code_is_off_unless_the_model_config_turns_it_on_and_the_record_says_so(bases, tmp_path, load):
    _, record, _ = load()
    assert record["config"]["model"]["trust_remote_code"] is False
    assert entry(record, "config_merge")["facts"]["trust_remote_code"] is False

    marker = tmp_path / "code-ran"
    ships = REMOTE | {"auto_map": REMOTE["auto_map"] | {"AutoConfig": "modeling_x.XConfig"}, "x_marker": str(marker)}
    ckpt = broken_copy(
        Case("ships-code", [], None, "", breaks=edit_json("config.json", lambda d: d | ships)), bases, tmp_path
    )
    (ckpt / "modeling_x.py").write_text(MODELING_X)
    before = file_digests(ckpt)
    with pytest.raises(StageError, match="runs only with model.trust_remote_code=true") as refused:
        load(f"model.path={ckpt}")
    assert refused.value.stage == "config_merge" and not marker.exists()

    model, record, _ = load(f"model.path={ckpt}", "model.trust_remote_code=true")
    assert marker.exists() and type(model).__name__ == "XForCausalLM"  # the repo's own code built the model
    assert record["config"]["model"]["trust_remote_code"] is True
    assert entry(record, "config_merge")["facts"]["trust_remote_code"] is True
    reference, *_ = load(f"model.path={bases['plain']}")
    assert_same_weights(reference, model)
    assert file_digests(ckpt) == before


def test_the_table_fails_a_run_in_every_stage():
    assert set(STAGE_KINDS) <= {c.stage for c in CASES}
