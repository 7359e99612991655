from kit.migrations import run_env
from services.rules.shard_layout import ShardLayout  # noqa: F401  (its table is in Base.metadata)
from services.rules.stores.schema import Base

run_env(Base.metadata)
