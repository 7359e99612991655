from kit.migrations import run_env
from services.score.storage import Base

run_env(Base.metadata)
