"""The YAML config file: every key, its default and its checks.

A config is read in two steps, both of which report problems as one line each,
naming the file and the key path (``config.yml: consumers[1].prefetch_count:
...``):

1. ``load_config`` parses the YAML and checks the shape and types of every key
   (``load_config_dict`` does the same for a config given as a dict).
2. ``check_imports`` imports the startup handler and consumer classes and
   checks that they are what the daemon needs.

Neither step connects to a broker; ``--validate`` runs both and stops there.

One module per section, each with its key table (the single source of truth for
its keys): ``top_level`` (TOP_LEVEL_KEYS, ``Config``, ``load_config``),
``exchanges`` (EXCHANGE_KEYS), ``queues`` (QUEUE_KEYS, BINDING_KEYS),
``consumers`` (CONSUMER_KEYS, RETRY_KEYS), ``http`` (HTTP_KEYS); ``keys`` holds the
machinery they share, ``imports`` the importing of user code, and ``schema`` makes
the JSON Schema of the file from the key tables. Every name is importable from this
package.
"""

from .consumers import (
    _MAX_DELAY_SECONDS,
    CIRCUIT_BREAKER_KEYS,
    CONSUMER_KEYS,
    MAX_DELAY_QUEUES,
    RETRY_KEYS,
    CircuitBreakerConfig,
    ConsumerConfig,
    RetryConfig,
    _check_retry_names,
    _parse_retry,
    parse_consumers,
)
from .exchanges import BUILT_IN_TYPES, EXCHANGE_KEYS, ExchangeConfig, parse_exchanges
from .http import HTTP_KEYS, HttpConfig, parse_http
from .imports import (
    Resolved,
    _import,
    check_imports,
    describe_exception,
    import_object,
)
from .keys import (
    _TYPE_NAMES,
    ConfigError,
    _Checker,
    _describe,
    _DuplicateKeyError,
    _is_import_path,
    _Key,
    _read_yaml,
    _UniqueKeyLoader,
)
from .queues import (
    BINDING_KEYS,
    NAMED_ARGUMENTS,
    QUEUE_KEYS,
    Binding,
    QueueConfig,
    argument_name,
    parse_bindings,
    parse_queues,
)
from .schema import config_schema, schema_text
from .top_level import (
    TOP_LEVEL_KEYS,
    Config,
    _parse,
    load_config,
    load_config_dict,
    read_http,
    select,
)

__all__ = [
    "BINDING_KEYS", "BUILT_IN_TYPES", "CIRCUIT_BREAKER_KEYS", "CircuitBreakerConfig",
    "CONSUMER_KEYS", "EXCHANGE_KEYS", "HTTP_KEYS",
    "HttpConfig", "MAX_DELAY_QUEUES", "parse_http",
    "NAMED_ARGUMENTS", "QUEUE_KEYS", "RETRY_KEYS", "TOP_LEVEL_KEYS", "Binding", "Config",
    "ConfigError", "ConsumerConfig", "ExchangeConfig", "QueueConfig", "Resolved",
    "RetryConfig", "argument_name", "check_imports", "config_schema", "describe_exception",
    "import_object", "load_config", "load_config_dict", "parse_bindings", "parse_consumers",
    "parse_exchanges", "parse_queues", "read_http", "schema_text", "select",
    "_MAX_DELAY_SECONDS", "_TYPE_NAMES", "_Checker", "_DuplicateKeyError", "_Key",
    "_UniqueKeyLoader", "_check_retry_names", "_describe", "_import", "_is_import_path",
    "_parse", "_parse_retry", "_read_yaml",
]
