FROM python:3.11-slim
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY tokenrelay_cli ./tokenrelay_cli
RUN pip install --no-cache-dir -r requirements.lock .
USER nobody
EXPOSE 8000
CMD ["tokenrelay", "api", "--host", "0.0.0.0", "--port", "8000"]
