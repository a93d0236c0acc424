"""inferpool: a Ray-native pool of LLM inference engines for RL rollouts."""

from inferpool.config import EngineConfig, PoolConfig, RouterConfig, SessionConfig, WeightTransferConfig
from inferpool.errors import (
    BackendError,
    ConfigError,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    EngineTimeoutError,
    InferpoolError,
    NoHealthyEngineError,
    RequestError,
    SessionError,
    SessionExpiredError,
    SessionNotFoundError,
    StaleSessionError,
)
from inferpool.openai_types import ChatCompletion, Completion
from inferpool.pool import Pool
from inferpool.reasoning import ReasoningConfig
from inferpool.sequences import SequenceNode, SessionState
from inferpool.session import Session
from inferpool.types import (
    Choice,
    EngineInfo,
    EngineStats,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
)

__version__ = "0.1.0"

# Imported eagerly: importing the submodule later would replace this name with the module.
from inferpool.tiny_model import tiny_model

__all__ = [
    "BackendError",
    "ChatCompletion",
    "Choice",
    "Completion",
    "ConfigError",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineInfo",
    "EngineOverloadedError",
    "EngineStats",
    "EngineTimeoutError",
    "GenerateRequest",
    "GenerateResult",
    "InferpoolError",
    "NoHealthyEngineError",
    "Pool",
    "PoolConfig",
    "ReasoningConfig",
    "RequestError",
    "RouterConfig",
    "SamplingParams",
    "SequenceNode",
    "Session",
    "SessionConfig",
    "SessionError",
    "SessionExpiredError",
    "SessionNotFoundError",
    "SessionState",
    "StaleSessionError",
    "WeightTransferConfig",
    "__version__",
    "tiny_model",
]
