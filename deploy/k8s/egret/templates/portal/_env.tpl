{{/*
The portal's container settings (docs/portal.md, "Settings"): where it listens and is reached,
the identity provider, the services it calls (over TLS with its client certificate, or plain
text in insecure mode), its own token for the public pages, tracing, and the log settings of
`env`, then portal.env on top.
*/}}
{{- define "egret.portalEnv" -}}
{{- $root := . -}}
{{- $portal := .Values.portal -}}
{{- $fullname := include "egret.fullname" . -}}
{{- $secrets := .Values.secrets.portal -}}
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: K8S_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- $settings := dict
  "EGRET_LISTEN_ADDRESS" (printf "0.0.0.0:%d" (int $portal.port))
  "EGRET_PORTAL_PUBLIC_URL" ($portal.publicUrl | trimSuffix "/")
  "EGRET_PORTAL_OIDC_ISSUER" (include "egret.portalIssuer" .)
  "EGRET_PORTAL_OIDC_CLIENT_ID" $portal.oidc.clientId
  "EGRET_PORTAL_OIDC_CLIENT_SECRET_FILE" (printf "%s/%s" (include "egret.portalOidcDir" .) $secrets.oidcClientSecret.key)
  "EGRET_PORTAL_OIDC_REDIRECT_PATH" $portal.oidc.redirectPath
  "EGRET_PORTAL_OIDC_SCOPE" $portal.oidc.scope
  "EGRET_PORTAL_ROLE_CLAIM" $portal.oidc.roleClaim
  "EGRET_PORTAL_SUBJECT_CLAIM" $portal.oidc.subjectClaim
  "EGRET_PORTAL_SESSION_SECRET_FILE" (printf "%s/%s" (include "egret.portalSessionDir" .) $secrets.sessionSecret.key)
  "EGRET_QUERY_ADDRESS" (include "egret.address" (dict "root" . "service" "query"))
  "EGRET_SCORE_ADDRESS" (include "egret.address" (dict "root" . "service" "score"))
  "EGRET_INGEST_ADDRESS" (include "egret.address" (dict "root" . "service" "ingest"))
-}}
{{- /* The published rules page reads the active rule set; every shard holds the same rule sets. */ -}}
{{- if gt (int .Values.services.rules.shards) 1 -}}
{{- $_ := set $settings "EGRET_RULES_ADDRESS" (printf "%s-rules-0:%d" $fullname (int .Values.services.rules.port)) -}}
{{- else -}}
{{- $_ := set $settings "EGRET_RULES_ADDRESS" (include "egret.address" (dict "root" . "service" "rules")) -}}
{{- end -}}
{{- with $portal.trustedProxies -}}
{{- $_ := set $settings "EGRET_PORTAL_TRUSTED_PROXIES" (join "," .) -}}
{{- end -}}
{{- if $portal.oidc.ca.name -}}
{{- $_ := set $settings "EGRET_PORTAL_OIDC_CA_FILE" (printf "%s/%s" (include "egret.portalOidcCaDir" .) $portal.oidc.ca.key) -}}
{{- end -}}
{{- $settings = merge $settings (include "egret.otelSettings" (dict "root" . "service" "portal") | fromJson) -}}
{{- if .Values.security.insecure -}}
{{- $_ := set $settings "EGRET_INSECURE" "true" -}}
{{- else -}}
{{- $_ := set $settings "EGRET_INSECURE" "false" -}}
{{- $tls := include "egret.tlsDir" . -}}
{{- /* Verifies the services; presents tls.crt (rules and score require a client certificate). */ -}}
{{- $_ := set $settings "EGRET_TLS_CA_FILE" (printf "%s/ca.crt" $tls) -}}
{{- $_ := set $settings "EGRET_TLS_CERT_FILE" (printf "%s/tls.crt" $tls) -}}
{{- $_ := set $settings "EGRET_TLS_KEY_FILE" (printf "%s/tls.key" $tls) -}}
{{- $_ := set $settings "EGRET_SERVICE_TOKEN_FILE" (printf "%s/%s" (include "egret.serviceTokenDir" .) .Values.security.serviceTokens.key) -}}
{{- end -}}
{{- /* Of the settings every service gets, the portal reads the log ones. */ -}}
{{- range $name := list "EGRET_LOG_FORMAT" "EGRET_LOG_LEVEL" -}}
{{- if hasKey $root.Values.env $name -}}
{{- $_ := set $settings $name (index $root.Values.env $name) -}}
{{- end -}}
{{- end -}}
{{- $settings = mergeOverwrite $settings (deepCopy $portal.env) -}}
{{- range $name := keys $settings | sortAlpha }}
- name: {{ $name }}
  value: {{ index $settings $name | toString | quote }}
{{- end }}
{{- end -}}

{{/* The portal's mounts: scratch, its two secrets, the provider's CA, TLS and its token. */}}
{{- define "egret.portalVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: oidc-client-secret
  mountPath: {{ include "egret.portalOidcDir" . }}
  readOnly: true
- name: session-secret
  mountPath: {{ include "egret.portalSessionDir" . }}
  readOnly: true
{{- if .Values.portal.oidc.ca.name }}
- name: oidc-ca
  mountPath: {{ include "egret.portalOidcCaDir" . }}
  readOnly: true
{{- end }}
{{- include "egret.otelCaMount" . }}
{{- if not .Values.security.insecure }}
- name: tls
  mountPath: {{ include "egret.tlsDir" . }}
  readOnly: true
- name: service-token
  mountPath: {{ include "egret.serviceTokenDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "egret.portalVolumes" -}}
{{- $secrets := .Values.secrets.portal -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
- name: oidc-client-secret
  secret:
    secretName: {{ include "egret.portalOidcSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ $secrets.oidcClientSecret.key }}
        path: {{ $secrets.oidcClientSecret.key }}
- name: session-secret
  secret:
    secretName: {{ include "egret.portalSessionSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ $secrets.sessionSecret.key }}
        path: {{ $secrets.sessionSecret.key }}
{{- if .Values.portal.oidc.ca.name }}
{{ include "egret.keyVolume" (dict "name" "oidc-ca" "source" .Values.portal.oidc.ca) }}
{{- end }}
{{- include "egret.otelCaVolume" . }}
{{- if not .Values.security.insecure }}
{{ include "egret.tlsVolume" (dict "root" . "name" "portal") }}
- name: service-token
  secret:
    secretName: {{ include "egret.serviceTokenSecretName" (dict "root" . "name" "portal") }}
    defaultMode: 0440
    items:
      - key: {{ .Values.security.serviceTokens.key }}
        path: {{ .Values.security.serviceTokens.key }}
{{- end }}
{{- end -}}
