/* Bilten dev shim (not Confluent code); see ../SchemaRegistryClient.java. */
package io.confluent.kafka.schemaregistry.client.rest;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.io.InputStream;
import java.net.HttpURLConnection;
import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.util.Base64;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import javax.net.ssl.HttpsURLConnection;
import javax.net.ssl.SSLSocketFactory;

public class RestService {
  private static final ObjectMapper MAPPER = new ObjectMapper();
  private final List<String> _baseUrls = new ArrayList<>();
  private volatile SSLSocketFactory _sslSocketFactory;
  private volatile String _authorization;  // the Authorization header value, or null

  public RestService(String baseUrlConfig) {
    for (String url : baseUrlConfig.split(",")) {
      String u = url.trim();
      while (u.endsWith("/")) {
        u = u.substring(0, u.length() - 1);
      }
      if (!u.isEmpty()) {
        _baseUrls.add(u);
      }
    }
    if (_baseUrls.isEmpty()) {
      throw new IllegalArgumentException("no schema registry url in '" + baseUrlConfig + "'");
    }
  }

  public void setSslSocketFactory(SSLSocketFactory sslSocketFactory) {
    _sslSocketFactory = sslSocketFactory;
  }

  /**
   * Credentials as Confluent's client reads them (SchemaRegistryClientConfig):
   * basic.auth.credentials.source USER_INFO (basic.auth.user.info = user:password) or URL
   * (user:password in the registry URL), or bearer.auth.credentials.source STATIC_TOKEN
   * (bearer.auth.token). Unknown sources are refused rather than silently ignored.
   */
  public void configure(Map<String, ?> configs) {
    Object basicSource = configs.get("basic.auth.credentials.source");
    Object bearerSource = configs.get("bearer.auth.credentials.source");
    if (basicSource != null && !basicSource.toString().isEmpty()) {
      String source = basicSource.toString();
      String userInfo;
      if ("USER_INFO".equals(source)) {
        Object value = configs.get("basic.auth.user.info");
        userInfo = value == null ? "" : value.toString();
      } else if ("URL".equals(source)) {
        String info = null;
        for (String base : _baseUrls) {
          try {
            info = new URL(base).getUserInfo();
          } catch (java.net.MalformedURLException e) {
            throw new IllegalArgumentException("schema registry url " + base + ": " + e.getMessage());
          }
          if (info != null) {
            break;
          }
        }
        userInfo = info == null ? "" : info;
      } else {
        throw new IllegalArgumentException("basic.auth.credentials.source " + source
            + " is not supported by this client (USER_INFO or URL)");
      }
      if (userInfo.isEmpty()) {
        throw new IllegalArgumentException("basic.auth.credentials.source " + source + " gives no user info");
      }
      _authorization = "Basic " + Base64.getEncoder().encodeToString(userInfo.getBytes(StandardCharsets.UTF_8));
    } else if (bearerSource != null && !bearerSource.toString().isEmpty()) {
      if (!"STATIC_TOKEN".equals(bearerSource.toString())) {
        throw new IllegalArgumentException("bearer.auth.credentials.source " + bearerSource
            + " is not supported by this client (STATIC_TOKEN)");
      }
      Object token = configs.get("bearer.auth.token");
      if (token == null || token.toString().isEmpty()) {
        throw new IllegalArgumentException("bearer.auth.credentials.source STATIC_TOKEN without bearer.auth.token");
      }
      _authorization = "Bearer " + token;
    }
  }

  /** GET {url}/schemas/ids/{id} and return its "schema" field; tries each url in turn. */
  public String getSchemaString(int id) throws IOException {
    IOException last = null;
    for (String base : _baseUrls) {
      HttpURLConnection conn = (HttpURLConnection) new URL(base + "/schemas/ids/" + id).openConnection();
      try {
        if (conn instanceof HttpsURLConnection && _sslSocketFactory != null) {
          ((HttpsURLConnection) conn).setSSLSocketFactory(_sslSocketFactory);
        }
        conn.setConnectTimeout(10_000);
        conn.setReadTimeout(30_000);
        conn.setRequestProperty("Accept", "application/vnd.schemaregistry.v1+json, application/json");
        if (_authorization != null) {
          conn.setRequestProperty("Authorization", _authorization);
        }
        int status = conn.getResponseCode();
        InputStream in = status < 400 ? conn.getInputStream() : conn.getErrorStream();
        JsonNode body = in == null ? null : MAPPER.readTree(in);
        if (status != 200 || body == null || !body.hasNonNull("schema")) {
          String msg = body != null && body.hasNonNull("message") ? body.get("message").asText() : "HTTP " + status;
          last = new IOException("schema registry " + base + ": id " + id + ": " + msg);
          if (status >= 400 && status < 500) {
            throw last;  // a 404 from one registry is the answer, not a reason to try the next
          }
          continue;
        }
        String type = body.hasNonNull("schemaType") ? body.get("schemaType").asText() : "AVRO";
        if (!"AVRO".equals(type)) {
          throw new IOException("schema id " + id + " is " + type + ", only AVRO is supported");
        }
        return body.get("schema").asText();
      } catch (java.net.ConnectException | java.net.SocketTimeoutException e) {
        last = e;
      } finally {
        conn.disconnect();
      }
    }
    throw last;
  }
}
