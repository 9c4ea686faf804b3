/* Bilten dev shim (not Confluent code); see ../SchemaRegistryClient.java. */
package io.confluent.kafka.schemaregistry.client.rest;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.io.InputStream;
import java.net.HttpURLConnection;
import java.net.URL;
import java.util.ArrayList;
import java.util.List;
import javax.net.ssl.HttpsURLConnection;
import javax.net.ssl.SSLSocketFactory;

public class RestService {
  private static final ObjectMapper MAPPER = new ObjectMapper();
  private final List<String> _baseUrls = new ArrayList<>();
  private volatile SSLSocketFactory _sslSocketFactory;

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
