from kit.migrations import run_env
from services.query.stores.access_log import Base

run_env(Base.metadata)
