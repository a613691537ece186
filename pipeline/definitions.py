"""The code location: every asset, check, job, schedule, sensor and resource of Scriptorium."""

import dagster as dg

from pipeline.assets import (
    alignment,
    evaluation,
    export,
    gutenberg,
    preferences,
    pretrain,
    sft,
    tokens,
)
from pipeline.automation import JOBS, SCHEDULES, SENSORS
from pipeline.checks import ALL_CHECKS
from pipeline.resources import resources_from_env
from pipeline.sft_checks import SFT_CHECKS

all_assets = dg.load_assets_from_modules(
    [gutenberg, tokens, pretrain, sft, preferences, alignment, export, evaluation]
)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=[*ALL_CHECKS, *SFT_CHECKS],
    jobs=JOBS,
    schedules=SCHEDULES,
    sensors=SENSORS,
    resources=resources_from_env(),
)
