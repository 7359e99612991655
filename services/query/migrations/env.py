from kit.migrations import run_env
from services.query.access_log import Base

run_env(Base.metadata)
