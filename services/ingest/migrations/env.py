from kit.migrations import run_env
from services.ingest.stores.events import Base

run_env(Base.metadata)
