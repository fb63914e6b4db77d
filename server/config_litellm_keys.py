"""The LiteLLM keys budgetd accepts and ignores: the one list.

A LiteLLM ``config.yaml`` should load unchanged, so every key LiteLLM documents for these
sections is accepted (https://docs.litellm.ai/docs/proxy/config_settings, .../token_auth,
.../team_budgets); the keys budgetd uses are the fields of the models in
:mod:`server.config_model`. A key in neither is an error, so typos are caught. Route/RBAC,
logging, caching and routing settings are the gateway's or LiteLLM's business, not a budget
authority's.

:data:`LITELLM_IGNORED_KEYS` maps a section (a model's ``SECTION``) to the keys it drops unread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

LITELLM_IGNORED_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "": frozenset(
        {  # other top-level sections of LiteLLM's config.yaml
            "callback_settings", "guardrails", "credential_list", "mcp_servers",
            "assistant_settings", "files_settings", "finetune_settings",
            "vector_store_registry", "search_tools", "prompts",
        }
    ),
    "general_settings": frozenset(
        {
            "completion_model", "disable_spend_logs", "disable_spend_updates",
            "disable_master_key_return", "disable_retry_on_max_parallel_request_limit_error",
            "disable_reset_budget", "disable_adding_master_key_hash_to_db",
            "disable_responses_id_security", "enforce_user_param",
            "reject_clientside_metadata_tags", "allowed_routes", "key_management_system",
            "database_connection_pool_limit", "database_connection_timeout",
            "allow_requests_on_db_unavailable", "custom_auth", "max_parallel_requests",
            "global_max_parallel_requests", "infer_model_from_keys",
            "background_health_checks", "health_check_interval", "health_check_details",
            "alerting", "alerting_threshold", "alerting_args", "alert_types",
            "alert_to_webhook_url", "use_client_credentials_pass_through_routes",
            "public_routes", "admin_only_routes", "enforced_params", "enable_oauth2_auth",
            "enable_oauth2_proxy_auth", "oauth2_config_mappings", "use_x_forwarded_for",
            "service_account_settings", "image_generation_model", "embedding_model",
            "moderation_model", "store_model_in_db", "supported_db_objects",
            "user_mcp_management_mode", "store_prompts_in_spend_logs", "max_request_size_mb",
            "max_response_size_mb", "proxy_budget_rescheduler_min_time",
            "proxy_budget_rescheduler_max_time", "proxy_batch_write_at",
            "proxy_batch_polling_interval", "custom_key_generate", "custom_sso", "allowed_ips",
            "default_team_disabled", "key_management_settings", "allow_user_auth",
            "user_api_key_cache_ttl", "disable_prisma_schema_update",
            "litellm_key_header_name", "user_header_name", "allow_client_side_credentials",
            "use_azure_key_vault", "use_google_kms", "spend_report_frequency",
            "ui_access_mode", "litellm_license", "pass_through_endpoints",
            "forward_openai_org_id", "forward_client_headers_to_llm_api",
            "maximum_spend_logs_retention_period", "maximum_spend_logs_retention_interval",
            "use_redis_transaction_buffer",
        }
    ),
    "litellm_settings": frozenset(
        {
            "callbacks", "service_callbacks", "turn_off_message_logging",
            "redact_user_api_key_info", "redact_messages_in_exceptions",
            "langfuse_default_tags", "request_timeout", "force_ipv4", "json_logs",
            "set_verbose", "drop_params", "modify_params", "num_retries", "allowed_fails",
            "default_fallbacks", "fallbacks", "content_policy_fallbacks",
            "context_window_fallbacks", "mcp_aliases", "cache", "cache_params",
            "enable_preview_features", "disable_end_user_cost_tracking",
            "disable_end_user_cost_tracking_prometheus_only", "key_generation_settings",
            "disable_add_transform_inline_image_block",
            "use_chat_completions_url_for_anthropic_messages", "disable_hf_tokenizer_download",
            "enable_json_schema_validation", "enable_key_alias_format_validation",
            "disable_copilot_system_to_assistant", "LITELLM_DISABLE_STOP_SEQUENCE_LIMIT",
            "max_budget", "budget_duration", "max_internal_user_budget",
            "internal_user_budget_duration", "max_end_user_budget",
            "default_internal_user_params", "default_key_generate_params",
            "upperbound_key_generate_params", "store_audit_logs", "guardrails",
            "return_response_headers", "ssl_verify", "telemetry",
            "prometheus_initialize_budget_metrics", "custom_prometheus_metadata_labels",
            "require_auth_for_metrics_endpoint", "public_teams", "global_disable_no_log_param",
            "disable_token_counter", "s3_callback_params", "extra_spend_tag_headers",
        }
    ),
    "litellm_jwtauth": frozenset(
        {
            "admin_allowed_routes", "team_jwt_scope", "team_allowed_routes",
            "upsert_sso_user_to_team", "user_roles_jwt_field", "user_allowed_roles",
            "public_allowed_routes", "enforce_rbac", "roles_jwt_field", "role_mappings",
            "object_id_jwt_field", "scope_mappings", "enforce_scope_based_access",
            "enforce_team_based_model_access", "custom_validate", "jwt_litellm_role_map",
            "sync_user_role_and_teams",
        }
    ),
    "router_settings": frozenset(
        {
            "routing_strategy", "routing_strategy_args", "redis_host", "redis_password",
            "redis_port", "redis_db", "redis_url", "enable_pre_call_check",
            "enable_pre_call_checks", "optional_pre_call_checks", "fallbacks",
            "content_policy_fallbacks", "context_window_fallbacks", "default_fallbacks",
            "max_fallbacks", "enable_tag_filtering", "tag_filtering_match_any",
            "cooldown_time", "disable_cooldowns", "retry_policy", "model_group_retry_policy",
            "allowed_fails", "allowed_fails_policy", "num_retries", "retry_after",
            "default_max_parallel_requests", "default_priority", "polling_interval",
            "default_litellm_params", "timeout", "stream_timeout", "debug_level",
            "set_verbose", "client_ttl", "cache_kwargs", "cache_responses",
            "caching_groups", "model_group_alias", "alerting_config", "assistants_config",
            "provider_budget_config", "router_general_settings",
            "deployment_affinity_ttl_seconds", "ignore_invalid_deployments", "search_tools",
            "guardrail_list",
        }
    ),
    # Entries of litellm_settings.default_team_settings: LiteLLM's team fields and the
    # per-team logging settings LiteLLM also reads from there.
    "default_team_settings[]": frozenset(
        {
            "organization_id", "members_with_roles", "metadata", "tags", "blocked",
            "model_aliases", "guardrails", "model_rpm_limit", "model_tpm_limit",
            "team_member_permissions", "team_member_key_duration", "object_permission",
            "prompts", "allowed_passthrough_routes", "max_parallel_requests",
            "success_callback", "failure_callback", "callback_vars", "langfuse_public_key",
            "langfuse_secret", "langfuse_secret_key", "langfuse_host",
        }
    ),
    # Pricing keys of model_list entries that budgetd does not price by. Any other
    # litellm_params/model_info key is passed through to providers by LiteLLM and is
    # accepted, except one that looks like a misspelled input/output_cost_per_token.
    "cost_keys": frozenset(
        {
            "input_cost_per_second", "output_cost_per_second", "input_cost_per_character",
            "output_cost_per_character", "input_cost_per_pixel", "output_cost_per_pixel",
            "input_cost_per_image", "output_cost_per_image", "input_cost_per_query",
            "input_cost_per_audio_token", "output_cost_per_audio_token",
            "input_cost_per_audio_per_second", "input_cost_per_video_per_second",
            "output_cost_per_reasoning_token", "input_cost_per_token_batches",
            "output_cost_per_token_batches", "input_cost_per_token_above_128k_tokens",
            "output_cost_per_token_above_128k_tokens",
            "input_cost_per_token_above_200k_tokens",
            "output_cost_per_token_above_200k_tokens", "cache_creation_input_token_cost",
            "cache_creation_input_token_cost_above_1hr", "cache_read_input_token_cost",
            "cache_read_input_token_cost_above_200k_tokens", "citation_cost_per_token",
            "search_context_cost_per_query", "input_cost_per_request",
            "input_cost_per_image_token", "output_cost_per_image_token",
            "cache_read_input_audio_token_cost", "cache_creation_input_audio_token_cost",
        }
    ),
}  # fmt: skip
