from kit.migrations import run_env
from services.rules.storage import Base

run_env(Base.metadata)
