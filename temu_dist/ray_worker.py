"""What each Ray worker process of a search runs as it starts (runtime_env's worker_process_setup_hook). A module of
its own, importing logging alone: every worker runs it, Ray's own actors too, and temu_dist.tune costs 3.1 CPU-seconds
to import."""
import logging


def setup() -> None:
    # Ray Train's placement group cleaner asks Ray's State API each second whether the trial's controller is alive, and
    # warned each time the API was not there: in every Ray without its dashboard, as ray[tune] installs it.
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
