from kit.migrations import run_env
from services.query.access_log_storage import Base

run_env(Base.metadata)
