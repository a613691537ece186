"""``evaluation_report``: every model stage measured on held-out text and benchmarks.

The last asset of the graph. It depends on every stage (``deps``, so ``--select '*'`` runs it
last) but needs only ``pretrained_weights`` (plus the tokenizer and shards): a stage that is not
materialised is reported as absent, never faked. Scoring runs in a Pipes subprocess
(``python -m pipeline.child``), like training, so torch memory leaves with it; it shares the
``train`` pool so it never competes with a training run for the cores. The child reports the
materialisation (headline figures as numeric metadata, the markdown table, the MLflow run link)
and the four checks of :data:`pipeline.eval.checks.CHECKS`.
"""

import os
from collections.abc import Iterator

import dagster as dg

from pipeline.artefacts import rlhf_method_key
from pipeline.assets.alignment import RLHF_METHODS
from pipeline.eval.checks import CHECKS, FINITE
from pipeline.launch import launch_stage
from pipeline.resources import Compute, MlflowTracking, Paths, Profile, profile_code_version

GROUP = "evaluation"
CODE_VERSION = "2"  # 2: MMLU, HumanEval (sandboxed), scorecard and trend
# Required: the base model and what it is measured on. Optional: the later stages and the data
# some benchmarks read (each absent one is named in the report).
REQUIRED = {
    "pretrained_weights": "model.safetensors",
    "bpe_tokenizer": "tokenizer.json",
    "token_shards": "manifest.json",
}
OPTIONAL = ("eval_sets", "sft_mixture", "sft_weights", "reward_model", "rlhf_weights")
KEY = dg.AssetKey("evaluation_report")


@dg.asset(
    group_name=GROUP,
    code_version=profile_code_version(CODE_VERSION, "evaluation", "seed", "pretrain", "sft_train"),
    # ... and every rlhf/<method> the profile keeps: the report has a column per method
    deps=[
        *(dg.AssetKey(k) for k in (*REQUIRED, *OPTIONAL)),
        *(dg.AssetKey.from_user_string(rlhf_method_key(m)) for m in RLHF_METHODS),
    ],
    check_specs=[
        dg.AssetCheckSpec(name, asset=KEY, description=desc, blocking=name == FINITE)
        for name, (desc, _) in CHECKS.items()
    ],
    pool="train",
    kinds={"pytorch", "mlflow"},
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    paths: Paths,
    profile: Profile,
    mlflow: MlflowTracking,
    compute: Compute,
    pipes: dg.PipesSubprocessClient,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """``report.json`` / ``report.md`` / ``report.html``: bpb, BLiMP, LAMBADA, GSM8K, MMLU,
    HumanEval (when the profile enables running generated code) and win rates of each stage
    (base, sft, rlhf) as a scorecard, compared with the previous evaluation and plotted across
    the last ones in MLflow."""
    for key, filename in REQUIRED.items():
        paths.require(key, filename)
    out = paths.asset_dir("evaluation_report")
    p = profile.load()
    # Imported here: the scoring code loads torch, which no other step process needs.
    from pipeline.eval.run import HttpJudgeConfig

    judge = HttpJudgeConfig.from_env(os.environ)
    config = {
        "profile": p,
        "data_root": str(paths.root()),
        "out_dir": str(out),
        "device": compute.device,
    }
    yield from launch_stage(
        context,
        stage="evaluation",
        config=config,
        upstream_keys=[*REQUIRED, *OPTIONAL],
        version_parts=[p.get("evaluation"), judge.public_url if judge else None, CODE_VERSION],
        pipes_client=pipes,
        paths=paths,
        mlflow=mlflow,
        compute=Compute(  # scoring runs in one process, on all the cores
            device=compute.device, threads=compute.threads, omp_wait_policy=compute.omp_wait_policy
        ),
        profile_name=str(p.get("name")),
    )
