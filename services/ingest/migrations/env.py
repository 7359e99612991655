from kit.migrations import run_env
from services.ingest.storage import Base

run_env(Base.metadata)
