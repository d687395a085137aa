"""The pipeline: recipes run as ordered stages (one registry of handlers), and one block runner shared by
every stage that calibrates block by block, in memory or on blocks loaded from disk."""

from bitsmith.pipeline.blocks import BlockSource, run_blocks
from bitsmith.pipeline.registry import STAGES, register_stage
from bitsmith.pipeline.report import Report, StageReport
from bitsmith.pipeline.run import Context, run_stages

__all__ = ["BlockSource", "Context", "Report", "STAGES", "StageReport", "register_stage", "run_blocks", "run_stages"]
