{{/*
What a service's container is given, shared by its Deployment and its migration Job.
Arguments: dict "root" $ "workload" <item of egret.workloads> "job" <bool>.
*/}}

{{/* Environment: downward API first (referenced below as $(VAR)), then Secrets, then settings. */}}
{{- define "egret.env" -}}
{{- $root := .root -}}
{{- $w := .workload -}}
{{- $service := $w.service -}}
{{- $fullname := include "egret.fullname" $root -}}
{{- $values := index $root.Values.services $service -}}
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: K8S_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- if ne $service "query" }}
- name: EGRET_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "egret.databaseSecretName" $root }}
      key: {{ include "egret.databaseKey" . }}
{{- else }}
- name: EGRET_SCORE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "egret.databaseSecretName" $root }}
      key: {{ $root.Values.secrets.database.keys.scoreReadOnly }}
{{- end }}
{{- $settings := dict
  "EGRET_LISTEN_ADDRESS" (printf "0.0.0.0:%d" (int $values.port))
  "EGRET_DATA_DIR" "/var/lib/egret"
  "EGRET_MIGRATE_ON_START" (ternary "false" "true" $root.Values.migrations.enabled)
  "OTEL_SERVICE_NAME" (printf "egret-%s" $service)
  "OTEL_TRACES_SAMPLER" $root.Values.otel.sampler
-}}
{{- $attributes := list "service.namespace=egret" (printf "service.version=%s" (default $root.Chart.AppVersion $root.Values.image.tag)) "k8s.namespace.name=$(K8S_NAMESPACE)" "k8s.pod.name=$(K8S_POD_NAME)" -}}
{{- range $key, $value := $root.Values.otel.resourceAttributes -}}
{{- $attributes = append $attributes (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- $_ := set $settings "OTEL_RESOURCE_ATTRIBUTES" (join "," $attributes) -}}
{{- if $root.Values.otel.enabled -}}
{{- $_ := set $settings "OTEL_EXPORTER_OTLP_ENDPOINT" $root.Values.otel.endpoint -}}
{{- $_ := set $settings "OTEL_EXPORTER_OTLP_INSECURE" (ternary "true" "false" $root.Values.otel.insecure) -}}
{{- if $root.Values.otel.samplerArg -}}
{{- $_ := set $settings "OTEL_TRACES_SAMPLER_ARG" (toString $root.Values.otel.samplerArg) -}}
{{- end -}}
{{- else -}}
{{- $_ := set $settings "OTEL_TRACES_EXPORTER" "none" -}}
{{- end -}}
{{- if has $service (list "ingest" "query") -}}
{{- $_ := set $settings "EGRET_SUBJECT_KEY_FILE" (printf "%s/%s" (include "egret.subjectKeyDir" $root) $root.Values.secrets.subjectKey.key) -}}
{{- $_ := set $settings "EGRET_SUBJECT_KEY_ID" $root.Values.secrets.subjectKey.keyId -}}
{{- end -}}
{{- if not .job -}}
{{- if eq $service "ingest" -}}
{{- $_ := set $settings "EGRET_CATALOGUE_FILE" (printf "%s/catalogue/catalogue.yaml" (include "egret.configDir" $root)) -}}
{{- $shards := int $root.Values.services.rules.shards -}}
{{- if gt $shards 1 -}}
{{- $addresses := list -}}
{{- range $shard := until $shards -}}
{{- $addresses = append $addresses (printf "%s-rules-%d:%d" $fullname $shard (int $root.Values.services.rules.port)) -}}
{{- end -}}
{{- /* Shard order matters: ingest routes a subject to the shard at its index (kit/sharding.py). */ -}}
{{- $_ := set $settings "EGRET_RULES_ADDRESSES" (join "," $addresses) -}}
{{- else -}}
{{- $_ := set $settings "EGRET_RULES_ADDRESS" (include "egret.address" (dict "root" $root "service" "rules")) -}}
{{- end -}}
{{- end -}}
{{- if eq $service "rules" -}}
{{- $_ := set $settings "EGRET_RULESET_FILE" (printf "%s/rulesets/%s" (include "egret.configDir" $root) $root.Values.config.activeRuleset) -}}
{{- $_ := set $settings "EGRET_SCORE_ADDRESS" (include "egret.address" (dict "root" $root "service" "score")) -}}
{{- end -}}
{{- if has $service (list "score" "query") -}}
{{- $_ := set $settings "EGRET_POLICY_FILE" (printf "%s/policy/policy.yaml" (include "egret.configDir" $root)) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $service "rules") (ge (int $w.shard) 0) -}}
{{- $_ := set $settings "EGRET_RULES_SHARD" (toString $w.shard) -}}
{{- $_ := set $settings "EGRET_RULES_SHARDS" (toString $root.Values.services.rules.shards) -}}
{{- end -}}
{{- $settings = mergeOverwrite $settings (deepCopy $root.Values.env) (deepCopy $values.env) -}}
{{- range $name := keys $settings | sortAlpha }}
- name: {{ $name }}
  value: {{ index $settings $name | toString | quote }}
{{- end }}
{{- end -}}

{{/* Volume mounts of one container. */}}
{{- define "egret.volumeMounts" -}}
{{- $root := .root -}}
{{- $service := .workload.service -}}
{{- $config := include "egret.configDir" $root -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/egret
{{- if has $service (list "ingest" "query") }}
- name: subject-key
  mountPath: {{ include "egret.subjectKeyDir" $root }}
  readOnly: true
{{- end }}
{{- if not .job }}
{{- if eq $service "ingest" }}
- name: catalogue
  mountPath: {{ $config }}/catalogue
  readOnly: true
{{- end }}
{{- if eq $service "rules" }}
- name: rulesets
  mountPath: {{ $config }}/rulesets
  readOnly: true
{{- end }}
{{- if has $service (list "score" "query") }}
- name: policy
  mountPath: {{ $config }}/policy
  readOnly: true
{{- if $root.Values.config.benefits }}
- name: benefits
  mountPath: {{ $config }}/benefits
  readOnly: true
{{- end }}
{{- end }}
{{- if $root.Values.secrets.tls.enabled }}
- name: tls
  mountPath: {{ $config }}/tls
  readOnly: true
{{- end }}
{{- if $root.Values.secrets.jwt.enabled }}
- name: jwt
  mountPath: {{ $config }}/jwt
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* Volumes of one pod. */}}
{{- define "egret.volumes" -}}
{{- $root := .root -}}
{{- $service := .workload.service -}}
{{- $fullname := include "egret.fullname" $root -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
- name: data
  emptyDir:
    sizeLimit: 64Mi
{{- if has $service (list "ingest" "query") }}
- name: subject-key
  secret:
    secretName: {{ include "egret.subjectKeySecretName" $root }}
    defaultMode: 0440
    items:
      - key: {{ $root.Values.secrets.subjectKey.key }}
        path: {{ $root.Values.secrets.subjectKey.key }}
{{- end }}
{{- if not .job }}
{{- if eq $service "ingest" }}
- name: catalogue
  configMap:
    name: {{ $fullname }}-catalogue
{{- end }}
{{- if eq $service "rules" }}
- name: rulesets
  configMap:
    name: {{ $fullname }}-rulesets
{{- end }}
{{- if has $service (list "score" "query") }}
- name: policy
  configMap:
    name: {{ $fullname }}-policy
{{- if $root.Values.config.benefits }}
- name: benefits
  configMap:
    name: {{ $fullname }}-benefits
{{- end }}
{{- end }}
{{- if $root.Values.secrets.tls.enabled }}
- name: tls
  secret:
    secretName: {{ $root.Values.secrets.tls.name }}
    defaultMode: 0440
{{- end }}
{{- if $root.Values.secrets.jwt.enabled }}
- name: jwt
  secret:
    secretName: {{ $root.Values.secrets.jwt.name }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end -}}

{{/* The pod-level settings every Egret pod shares. */}}
{{- define "egret.podCommon" -}}
automountServiceAccountToken: {{ .Values.automountServiceAccountToken }}
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}
