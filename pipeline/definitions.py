"""The code location: every asset, check, job, schedule, sensor and resource of Scriptorium."""

import dagster as dg

from pipeline.assets import (
    alignment,
    classification,
    evaluation,
    export,
    gutenberg,
    imported,
    preferences,
    pretrain,
    sft,
    tokens,
)
from pipeline.automation import JOBS, SCHEDULES, SENSORS
from pipeline.checks import ALL_CHECKS
from pipeline.executors import executor_from_env
from pipeline.publish_job import publish_hf_export
from pipeline.resources import resources_from_env
from pipeline.sft_checks import SFT_CHECKS
from pipeline.text.profile_data import load_time_profile, without_skipped

# A profile may leave assets out of its graph (`skip_groups`, `skip_assets`: toy, verdict).
all_assets = without_skipped(
    dg.load_assets_from_modules(
        [
            gutenberg,
            imported,
            tokens,
            pretrain,
            sft,
            preferences,
            alignment,
            classification,
            export,
            evaluation,
        ]
    ),
    load_time_profile(),
)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=[*ALL_CHECKS, *SFT_CHECKS],
    jobs=[*JOBS, publish_hf_export],  # publishing is opt-in: never in an asset selection
    schedules=SCHEDULES,
    sensors=SENSORS,
    resources=resources_from_env(),
    executor=executor_from_env(),  # SCRIPTORIUM_EXECUTOR: multiprocess | celery | k8s
)
