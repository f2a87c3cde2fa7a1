{{- define "vmrw.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vmrw.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vmrw.labels" -}}
{{ include "vmrw.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- if .Values.excludeFromBackup }}
velero.io/exclude-from-backup: "true"
{{- end }}
{{- end -}}

{{- define "vmrw.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vmrw.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "vmrw.tlsSecretName" -}}
{{- if eq .Values.certificates.mode "provided" -}}
{{- required "certificates.provided.secretName is required with certificates.mode=provided" .Values.certificates.provided.secretName -}}
{{- else -}}
{{- printf "%s-tls" (include "vmrw.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "vmrw.serviceHost" -}}
{{- printf "%s.%s.svc" (include "vmrw.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/*
The Helm-made CA and serving certificate. An upgrade reuses the ones in the
existing Secret (found with `lookup`) while the CA has more than
certificates.helm.renewBeforeDays left, so the caBundle does not change under
running pods. A new pair is made on install, when the Secret is gone or
incomplete, or when the CA nears its end; the Secret records the CA's end in
an annotation because templates cannot parse certificates. A renewal's
caBundle (and the Secret's ca.crt) holds the new CA first and the one it
replaces second, so pods still serving the old certificate stay trusted. `helm template`
has no cluster to look in and always makes a new pair.
*/}}
{{- define "vmrw.helmCerts" -}}
{{- $fullname := include "vmrw.fullname" . -}}
{{- $host := include "vmrw.serviceHost" . -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "vmrw.tlsSecretName" .) -}}
{{- $reuse := false -}}
{{- if and $existing $existing.data -}}
{{- $data := $existing.data -}}
{{- $notAfter := index (($existing.metadata).annotations | default dict) "velero-vm-restore-webhook/ca-not-after" -}}
{{- if and (index $data "ca.crt") (index $data "tls.crt") (index $data "tls.key") $notAfter -}}
{{- $left := sub (atoi (toDate "2006-01-02T15:04:05Z07:00" $notAfter | unixEpoch)) (atoi (now | unixEpoch)) -}}
{{- if gt $left (mul (int .Values.certificates.helm.renewBeforeDays) 86400) -}}
{{- $reuse = true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $reuse -}}
{{- dict "ca" (index $existing.data "ca.crt") "crt" (index $existing.data "tls.crt") "key" (index $existing.data "tls.key") "notAfter" (index $existing.metadata.annotations "velero-vm-restore-webhook/ca-not-after") "reused" true | toJson -}}
{{- else -}}
{{- $days := int .Values.certificates.helm.validityDays -}}
{{- $ca := genCA (printf "%s-ca" $fullname) $days -}}
{{- $cert := genSignedCert $host nil (list $host (printf "%s.%s" $fullname .Release.Namespace) $fullname (printf "%s.cluster.local" $host)) $days $ca -}}
{{- $notAfter := now | dateModify (printf "+%dh" (mul $days 24)) | date "2006-01-02T15:04:05Z07:00" -}}
{{- /* A renewal keeps trusting the CA it replaces: the API server reads the
new caBundle at once, while each pod serves the old certificate until kubelet
refreshes the mounted Secret (up to a minute or more) and the pod reloads it. */ -}}
{{- $bundle := $ca.Cert -}}
{{- if and $existing $existing.data (index $existing.data "ca.crt") -}}
{{- $previous := regexFind "(?s)-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----" (index $existing.data "ca.crt" | b64dec) -}}
{{- if $previous -}}
{{- $bundle = printf "%s\n%s\n" (trimSuffix "\n" $ca.Cert) $previous -}}
{{- end -}}
{{- end -}}
{{- dict "ca" ($bundle | b64enc) "crt" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc) "notAfter" $notAfter "reused" false | toJson -}}
{{- end -}}
{{- end -}}

{{/* The fields both webhook entries share. */}}
{{- define "vmrw.webhookCommon" -}}
{{- $root := .root -}}
{{- $fullname := include "vmrw.fullname" $root -}}
admissionReviewVersions: ["v1"]
sideEffects: None
matchPolicy: Equivalent
timeoutSeconds: {{ $root.Values.webhook.timeoutSeconds }}
clientConfig:
  service:
    name: {{ $fullname }}
    namespace: {{ $root.Release.Namespace }}
    path: /mutate
    port: {{ $root.Values.service.port }}
  {{- if .caBundle }}
  caBundle: {{ .caBundle }}
  {{- end }}
objectSelector:
  matchExpressions:
    - key: velero.io/restore-name
      operator: Exists
namespaceSelector:
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: NotIn
      values:
        - {{ $root.Release.Namespace }}
        {{- range $root.Values.webhook.excludeNamespaces }}
        {{- if ne . $root.Release.Namespace }}
        - {{ . }}
        {{- end }}
        {{- end }}
{{- end -}}

{{/*
Velero's requests only: a matchCondition on the request's user, where the
API server has them (Kubernetes 1.28+). Without, the webhook itself leaves
anyone else's update unchanged (--velero-user), but is called for it.
*/}}
{{- define "vmrw.veleroOnly" -}}
{{- if .matchConditions -}}
{{- $tests := list -}}
{{- if .users -}}
{{- $tests = append $tests (printf "request.userInfo.username in [%s]" (include "vmrw.celStrings" .users)) -}}
{{- end -}}
{{- if .groups -}}
{{- $tests = append $tests (printf "(has(request.userInfo.groups) && request.userInfo.groups.exists(g, g in [%s]))" (include "vmrw.celStrings" .groups)) -}}
{{- end -}}
{{- if not $tests -}}
{{- fail "webhook.velero.users and webhook.velero.groups are both empty: nothing would be taken for Velero" -}}
{{- end -}}
{{- $expression := join " || " $tests -}}
{{- if .self -}}
{{- $expression = printf "(%s) && request.userInfo.username != '%s'" $expression .self -}}
{{- end }}
matchConditions:
  - name: velero-only
    expression: {{ $expression | quote }}
{{- end -}}
{{- end -}}

{{/* A list of strings as CEL string literals, comma-separated. */}}
{{- define "vmrw.celStrings" -}}
{{- $quoted := list -}}
{{- range . -}}
{{- $quoted = append $quoted (printf "'%s'" .) -}}
{{- end -}}
{{- join ", " $quoted -}}
{{- end -}}

{{/* The webhook image: registry/repository:tag (tag defaults to the chart's appVersion). */}}
{{- define "vmrw.image" -}}
{{- $repository := .Values.image.repository -}}
{{- if .Values.image.registry -}}
{{- $repository = printf "%s/%s" (trimSuffix "/" .Values.image.registry) .Values.image.repository -}}
{{- end -}}
{{- printf "%s:%s" $repository (.Values.image.tag | default .Chart.AppVersion) | quote -}}
{{- end -}}

{{/*
The API server's advertised addresses, as a JSON list of CIDRs (/32, /128):
the `kubernetes` EndpointSlice in namespace default (the Endpoints of the
same name where no slice exists), read with `lookup` at install and upgrade.
Empty under `helm template`, `--dry-run=client`, or with
networkPolicy.apiServer.lookup=false. A user who may not read them gets a
failed install (Helm's lookup fails on Forbidden): set lookup=false then.
*/}}
{{- define "vmrw.apiServerCIDRs" -}}
{{- $cidrs := list -}}
{{- if .Values.networkPolicy.apiServer.lookup -}}
{{- $slice := lookup "discovery.k8s.io/v1" "EndpointSlice" "default" "kubernetes" -}}
{{- if and $slice $slice.endpoints -}}
{{- range $slice.endpoints -}}
{{- range .addresses -}}
{{- $cidrs = append $cidrs (printf "%s/%s" . (ternary "128" "32" (contains ":" .))) -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- $endpoints := lookup "v1" "Endpoints" "default" "kubernetes" -}}
{{- range ($endpoints.subsets | default list) -}}
{{- range (.addresses | default list) -}}
{{- $cidrs = append $cidrs (printf "%s/%s" .ip (ternary "128" "32" (contains ":" .ip))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $cidrs | uniq | toJson -}}
{{- end -}}

{{/* Velero's identity: the users given, and the groups given or else every
ServiceAccount of Velero's namespace (Velero however it was installed). */}}
{{- define "vmrw.veleroUsers" -}}
{{- .Values.webhook.velero.users | default list | toJson -}}
{{- end -}}
{{- define "vmrw.veleroGroups" -}}
{{- .Values.webhook.velero.groups | default (list (printf "system:serviceaccounts:%s" .Values.server.veleroNamespace)) | toJson -}}
{{- end -}}

{{/* The webhook's own user: never Velero, even in Velero's group (its
companion patches restored groups). */}}
{{- define "vmrw.selfUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "vmrw.serviceAccountName" .) -}}
{{- end -}}
